"""Name -> builder registry for every network in :mod:`pipeline.models`.

Builders are keyword-only functions (as torchvision's ``models/_api.py`` registry): the registry refuses a
builder with positional parameters and refuses a name that is already taken, so two modules can never
silently shadow each other.  ``build_model`` checks keyword arguments against the builder's signature and
names every unknown one, instead of Python's "unexpected keyword argument" for the first only.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

Family = Literal["imagenet", "cifar"]
FAMILIES: tuple[str, ...] = ("imagenet", "cifar")

# Input resolution each family is designed for: 224 px crops for ImageNet (paper section 3.4),
# 32 px images for CIFAR-10 (paper section 4.2).
INPUT_SIZE: dict[str, int] = {"imagenet": 224, "cifar": 32}

BuilderT = TypeVar("BuilderT", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model besides how to build it."""

    name: str
    builder: Callable[..., nn.Module]
    layers: int  # weighted layers as the paper counts them: convolutions on the main path + fc
    family: Family
    block: str  # "basic" | "bottleneck" | "preact_basic" | "preact_bottleneck"
    reference_params: int | None  # exact count of the published reference (torchvision), 1000 classes
    paper_params_m: float | None  # count the paper prints, in millions (approximate by nature)
    source: str  # where the architecture is described

    def defaults(self) -> dict[str, Any]:
        """Keyword arguments the builder accepts, with their defaults."""
        parameters = inspect.signature(self.builder).parameters.values()
        return {p.name: p.default for p in parameters}


class ModelRegistry:
    """A mapping from model names to keyword-only builders that refuses duplicates."""

    def __init__(self) -> None:
        self._specs: dict[str, ModelSpec] = {}

    def register(
        self,
        name: str,
        *,
        layers: int,
        family: Family,
        block: str,
        source: str,
        reference_params: int | None = None,
        paper_params_m: float | None = None,
    ) -> Callable[[BuilderT], BuilderT]:
        """Decorator that registers ``builder`` under ``name``; raises ``ValueError`` if ``name`` is taken."""
        if not name or name != name.strip() or name.lower() != name:
            raise ValueError(f"model names are lower-case and non-empty, got {name!r}")
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

        def decorator(builder: BuilderT) -> BuilderT:
            if name in self._specs:
                existing = self._specs[name].builder
                raise ValueError(
                    f"model {name!r} is already registered "
                    f"(by {existing.__module__}.{existing.__qualname__}); pick another name"
                )
            positional = [
                p.name
                for p in inspect.signature(builder).parameters.values()
                if p.kind is not inspect.Parameter.KEYWORD_ONLY
            ]
            if positional:
                raise TypeError(
                    f"builder for {name!r} must take keyword-only arguments; {positional} are positional"
                )
            self._specs[name] = ModelSpec(
                name=name,
                builder=builder,
                layers=layers,
                family=family,
                block=block,
                reference_params=reference_params,
                paper_params_m=paper_params_m,
                source=source,
            )
            return builder

        return decorator

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._specs))

    def spec(self, name: str) -> ModelSpec:
        """The spec registered under ``name``; ``ValueError`` listing the valid names otherwise."""
        try:
            return self._specs[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._specs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            valid = ", ".join(self.names())
            raise ValueError(f"unknown model {name!r}{hint}; valid names: {valid}") from None

    def build(self, name: str, **kwargs: Any) -> nn.Module:
        """Build ``name``; ``TypeError`` naming every keyword argument its builder does not accept."""
        spec = self.spec(name)
        accepted = spec.defaults()
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"model {name!r} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"it accepts: {', '.join(accepted)}"
            )
        return spec.builder(**kwargs)


REGISTRY = ModelRegistry()
register_model = REGISTRY.register


def register_builder(
    name: str, make: Callable[..., nn.Module], *, options: dict[str, Any], doc: str, **spec: Any
) -> Callable[..., nn.Module]:
    """Register ``make(**options)`` as the keyword-only builder ``name``; ``spec`` is what
    ``ModelRegistry.register`` records (layers, family, block, source, reference_params, paper_params_m).

    ``options`` are the builder's keywords and their defaults (what ``model_info(...)["defaults"]`` shows and
    ``build_model`` checks); every family registers its members through here instead of one closure each.
    """

    def builder(**kwargs: Any) -> nn.Module:
        return make(**{**options, **kwargs})

    builder.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=value) for key, value in options.items()]
    )
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    return REGISTRY.register(name, **spec)(builder)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once, as ``model.parameters()`` yields it)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
