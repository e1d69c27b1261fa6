"""The report stage: the paper's error table rebuilt from metrics/eval/*.json, with figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.evaluation import table_rows
from pipeline.runtime import write_atomic, write_csv

if TYPE_CHECKING:
    from pipeline.data.shards import Manifest


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "—"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def reference_weights_note(rows: list[dict[str, Any]], references: dict[str, dict[str, Any]]) -> str:
    """What the "torchvision (our eval)" column holds: torchvision's weights found on this machine and
    re-evaluated by the evaluate stage with our code, skipped (not ImageNet-1k), or absent (we never download)."""
    from pipeline.models.pretrained import hub_checkpoints_dir

    evaluated = [f"{a} ({r['weights']})" for a, r in references.items() if "top1_err" in r]
    skipped = [f"{a} ({r['weights']}): {r['skipped']}" for a, r in references.items() if "skipped" in r]
    absent = [r["arch"] for r in rows if r["arch"] not in references]
    parts = []
    if evaluated:
        parts.append("torchvision's pretrained weights evaluated here with our evaluation code and precision "
                     "and each weight's own transform: "
                     + ", ".join(evaluated) + ".")
    if skipped:
        parts.append("Found but not evaluated: " + "; ".join(skipped) + ".")
    if absent:
        parts.append(f"Not present locally for {', '.join(absent)} (looked in `{hub_checkpoints_dir()}`; we never "
                     "download): the reference columns are the published numbers, not re-evaluated here.")
    return "Reference weights: " + " ".join(parts)


def precision_note(rows: list[dict[str, Any]]) -> str:
    """The precision the table's numbers were computed at (eval.precision), ours and the torchvision rows: one
    for all of them, or a warning naming each row's where they differ (metrics from before a change of
    eval.precision), since bf16 logits flip ~1% of top-1 predictions against fp32."""
    used = {r["arch"]: r.get("precision") for r in rows}
    refs = {f"{r['arch']} (torchvision weights)": r.get("torchvision_precision") for r in rows
            if r.get("torchvision_top1_err") is not None}
    used |= refs
    known = {v for v in used.values() if v}
    if not known:
        return "precision not recorded (evaluated before eval.precision was kept)"
    if len(known) > 1 or not all(used.values()):
        each = ", ".join(f"{k}: {v or 'not recorded'}" for k, v in used.items())
        return (f"**rows evaluated at different precisions, not comparable** ({each}); rerun "
                "`dvc repro --force evaluate@ARCH report`")
    precision = known.pop()
    note = f"evaluated in {precision} (eval.precision)" + (", ours and the torchvision row alike" if refs else "")
    if precision != "fp32":  # the published columns are torchvision's and the paper's own, fp32 numbers
        note += " (the published references are fp32: a Δ against them also measures the precision)"
    return note


def lr_cell(source: dict[str, Any] | None) -> str:
    """The table's short "lr (from)" cell: the lr trained with and the search or params it came from."""
    if not source:
        return "—"
    lr = f"{float(source['lr']):.4g}"
    if source.get("from") == "params":
        return f"{lr} (params)"
    return f"{lr} ({source.get('tuned_arch')} @ {source.get('selected_on')})"


def lr_provenance_lines(trains: dict[str, dict[str, Any]], archs: list[str]) -> list[str]:
    """One bullet per row: which lr it trained with, which tune search chose it on which split (or that it is
    the params' lr), the linear-rule rescaling, and which splits the final model trained on."""
    lines = []
    for arch in archs:
        tr = trains.get(arch) or {}
        src = tr.get("lr_source")
        if not src:
            lines.append(f"- {arch}: no record of where its lr came from (trained before lr provenance was kept).")
            continue
        data = " + ".join(tr.get("train_splits") or ["train"])
        full = "the full train set" if "minival" in (tr.get("train_splits") or []) else \
            "train minus minival (train.include_minival: false)"
        trained = f"trained on {data} ({tr.get('n_train_images', '?')} images, {full})"
        if src.get("from") == "params":
            lines.append(f"- {arch}: lr {float(src['lr']):.4g} at batch {src.get('batch_size')} from params "
                         f"(train.lr; {src.get('why')}); {trained}.")
            continue
        lines.append(
            f"- {arch}: lr {float(src['lr']):.4g} at batch {src['batch_size']} from {src.get('from')}: "
            f"{src.get('tuned_arch')}'s search ({src.get('rule')}), selected on the **{src.get('selected_on')}** "
            f"split ({src.get('selection_images')} train images held out; {src.get('selected_on')} top-1 err "
            f"{_fmt(src.get('selection_top1_err'))}%), tuned lr {float(src['tuned_lr']):.4g} at trial batch "
            f"{src.get('tuned_batch_size')} (rescaled: {src.get('scaled')}), warmup "
            f"{src.get('tuned_lr_warmup_epochs')} epochs; {trained}.")
    return lines


def render_markdown(rows: list[dict[str, Any]], dataset: dict[str, Any], figures: list[str],
                    references: dict[str, dict[str, Any]] | None = None,
                    trains: dict[str, dict[str, Any]] | None = None) -> str:
    synthetic = dataset.get("layout") == "synthetic"
    lines = ["# ResNet error table", ""]
    if synthetic:
        lines += [
            "> **Our numbers are on the embedded SYNTHETIC dataset** (generated shapes/colours/textures in "
            "ImageNet's folder layout), not on ImageNet. The reference columns are ImageNet-1k val errors; "
            "compare ours with chance error, not with the references.", "",
        ]
    lines += [
        f"Dataset: `{dataset.get('layout')}` from `{dataset.get('raw_dir')}`, {dataset.get('num_classes')} "
        f"classes, {dataset.get('n_val')} val images, fingerprint `{str(dataset.get('fingerprint'))[:12]}`.",
        "",
        "| model | layers | params (M) | top-1 err | top-5 err | chance top-1 "
        "| reference of our protocol: top-1 / top-5 (source) | Δ top-1 / top-5 vs it "
        "| other published references, top-1 / top-5 (source, protocol; no Δ) "
        "| torchvision weights, our eval (their transform), top-1 / top-5 "
        "| epochs | lr (from) | train time (s) | img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        matched = r.get("ref_source")
        others = "; ".join(f"{_fmt(e1)} / {_fmt(e5)} ({src})" for src, (e1, e5) in (r.get("references") or {}).items()
                           if src != r.get("ref_key"))
        lines.append(
            f"| {r['arch']} | {_fmt(r['layers'])} | {_fmt(r['params_m'])} | {_fmt(r['top1_err'])} | "
            f"{_fmt(r['top5_err'])} | {_fmt(r['chance_top1_err'])} | "
            f"{_fmt(r.get('ref_top1_err'))} / {_fmt(r.get('ref_top5_err'))} ({_fmt(matched)}) | "
            f"{_fmt(r.get('diff_top1_vs_ref'))} / {_fmt(r.get('diff_top5_vs_ref'))} | {others or '-'} | "
            f"{_fmt(r['torchvision_top1_err'])} / {_fmt(r['torchvision_top5_err'])} | "
            f"{_fmt(r['epochs'])} | {_fmt(r.get('lr_from'))} | "
            f"{_fmt(r['train_time_s'])} | "
            f"{_fmt(r['images_per_s'])} |"
        )
    lines += ["", reference_weights_note(rows, references or {})]
    if trains is not None:
        # The table's numbers are on val; no lr was chosen on it (tune selects on minival, held out of train).
        lines += ["", "Where each row's learning rate came from (the val set above chose none of them):", "",
                  *lr_provenance_lines(trains, [r["arch"] for r in rows])]
    proto = rows[0]["protocol"] if rows else ""
    lines += ["", f"Protocol (ours): {proto}; {precision_note(rows)}. A Δ is taken only "
              "against a reference of the same protocol (1-crop: torchvision V1 weights, resize 256, center crop "
              "224; 10-crop: He et al. 2015, Table 3, ResNet-18 from Table 2, top-1 only); the other columns are "
              "labelled with their source and protocol and never subtracted (torchvision V2: resize 232 crop "
              "224; fb.resnet.torch: 1-crop 224; paper Table 4: multi-scale fully-convolutional).", ""]
    for fig in figures:
        lines += [f"![{Path(fig).stem}]({Path(fig).name})", ""]
    return "\n".join(lines)


def _figures(rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax, xlabel in (("layers", axes[0], "layers"), ("params_m", axes[1], "parameters (M)")):
        xs = [r[key] for r in rows]
        ax.plot(xs, [r["top1_err"] for r in rows], "o-", label="ours top-1")
        ax.plot(xs, [r["top5_err"] for r in rows], "s-", label="ours top-5")
        if any(r.get("ref_top1_err") for r in rows):
            ax.plot(xs, [r.get("ref_top1_err") for r in rows], "o--", alpha=0.6,
                    label=f"ImageNet ref top-1 ({rows[0].get('ref_source', '').split(' (')[0]}, same protocol)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("error (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(str(out_dir / "error_vs_depth.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for arch, hist in curves.items():
            ax.plot([h["epoch"] for h in hist], [h["val_top1_err"] for h in hist], label=arch)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 error (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(str(out_dir / "training_curves.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _confusion_figure(details: dict[str, dict[str, Any]], classes: list[str], out: Path) -> str | None:
    """One confusion matrix per arch (rows: true class, columns: predicted), when there are <= 100 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mats = {a: np.asarray(d["confusion"]) for a, d in details.items() if d.get("confusion") is not None}
    if not mats:
        return None
    fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats), 3.4), squeeze=False)
    for ax, (arch, m) in zip(axes[0], mats.items(), strict=True):
        norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(arch, fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        if len(classes) <= 20:
            ax.set_xticks(range(len(classes)))
            ax.set_yticks(range(len(classes)))
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return str(out)


def per_class_rows(details: dict[str, dict[str, Any]], names: dict[str, str]) -> list[str]:
    """Markdown rows: per-class top-1 error (%) for each arch (<= 100 classes)."""
    archs = [a for a, d in details.items() if d.get("per_class_top1_err")]
    if not archs or len(details[archs[0]]["per_class_top1_err"]) > 100:
        return []
    wnids = list(details[archs[0]]["per_class_top1_err"])
    lines = ["| class | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for w in wnids:
        cells = " | ".join(f"{details[a]['per_class_top1_err'].get(w, float('nan')):.1f}" for a in archs)
        lines.append(f"| {w} {names.get(w, '')} | {cells} |")
    return lines


def build_report(eval_dir: str | Path, train_dir: str | Path, curve_dir: str | Path, manifest: Manifest,
                 out_dir: str | Path, details_dir: str | Path | None = None) -> list[dict[str, Any]]:
    import csv

    from pipeline.models import build_model, count_params

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evals = [json.loads(p.read_text()) for p in sorted(Path(eval_dir).glob("*.json"))]
    if not evals:
        raise FileNotFoundError(f"no evaluation results in {eval_dir} (run the evaluate stages first)")
    trains = {p.stem: json.loads(p.read_text()) for p in Path(train_dir).glob("*.json")}
    nc = int(manifest["num_classes"])
    counts = {ev["arch"]: count_params(build_model(ev["arch"], num_classes=nc)) for ev in evals}
    rows = table_rows(evals, trains, counts)
    for r in rows:  # the lr each row trained with, and what chose it (tune search + split, or params)
        src = (trains.get(r["arch"]) or {}).get("lr_source")
        r["lr"] = None if not src else float(src["lr"])
        r["lr_from"] = lr_cell(src) if src else None
        r["lr_selected_on"] = None if not src else (src.get("selected_on") or src.get("from"))
    curves = {}
    for r in rows:
        f = Path(curve_dir) / f"{r['arch']}.csv"
        if f.is_file():
            with f.open() as fh:
                curves[r["arch"]] = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    figures = _figures(rows, curves, out_dir)
    details = {}
    if details_dir is not None:
        for r in rows:
            f = Path(details_dir) / f"{r['arch']}_details.json"
            if f.is_file():
                details[r["arch"]] = json.loads(f.read_text())
    confusion = _confusion_figure(details, [c["wnid"] for c in manifest["classes"]], out_dir / "confusion.png")
    if confusion:
        figures.append(confusion)
    dataset = {**manifest["source"], "num_classes": nc, "n_val": manifest["splits"]["val"]["n_images"],
               "fingerprint": manifest["fingerprint"]}
    references = {ev["arch"]: ev["torchvision_reference"] for ev in evals if ev.get("torchvision_reference")}
    md = render_markdown(rows, dataset, figures, references, trains)
    per_class = per_class_rows(details, {c["wnid"]: c["name"] for c in manifest["classes"]})
    if per_class:
        md += "\n## Per-class top-1 error (%)\n\n" + "\n".join(per_class) + "\n"
    write_atomic(out_dir / "error_table.md", md.encode())
    write_csv(out_dir / "error_table.csv", rows)
    return rows
