"""Looking inside ResNets: the cheatsheet's visualisations and the numbers behind them.

>>> from pipeline.analysis import ResNetVisualizer, skip_contribution, model_summary
>>> viz = ResNetVisualizer(model)
>>> viz.plot_residual_flow(image, "layer2.0", Path("reports/residual_flow.png"))
>>> skip_contribution(model, images)["layer2.0"]["ratio"]        # ||F(x)|| / ||shortcut(x)||

``measure`` holds the pure measurements (numbers only; the model is left as found), ``plots`` the figures
(PNG via matplotlib's Agg canvas); neither logs anywhere.  ``degradation`` is the paper's plain-vs-residual
experiment (the ``degradation`` stage): it trains networks and records them through ``pipeline.tracking``;
``model_report`` writes every figure and number for one trained model (``python -m pipeline analyze``).
"""

from pipeline.analysis.measure import (
    batch_weight_gradients,
    branch_output_module,
    dead_relu_ratio,
    depth_gradient_norms,
    gradient_norms,
    gradient_stats,
    is_residual_block,
    layer_param_counts,
    model_summary,
    residual_blocks,
    skip_contribution,
)

# The figures load matplotlib (~0.3 s and ~40 MB): they are imported on first use, since a training worker given
# `measure.gradient_stats` (train.log_grad_stats) imports `measure` through this package and draws nothing.
_PLOTS = ("ResNetVisualizer", "compare_gradient_flow", "plot_degradation")


def __getattr__(name: str):  # PEP 562: `from pipeline.analysis import ResNetVisualizer` still works
    if name in _PLOTS:
        from pipeline.analysis import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'pipeline.analysis' has no attribute {name!r}")

__all__ = [
    "ResNetVisualizer",
    "batch_weight_gradients",
    "branch_output_module",
    "compare_gradient_flow",
    "dead_relu_ratio",
    "depth_gradient_norms",
    "gradient_norms",
    "gradient_stats",
    "is_residual_block",
    "layer_param_counts",
    "model_summary",
    "plot_degradation",
    "residual_blocks",
    "skip_contribution",
]
