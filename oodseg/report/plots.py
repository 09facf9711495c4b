"""The plots a researcher expects, as PNG bytes or files in the results store (matplotlib, Agg backend).

* :func:`plot_curves` — one figure per dataset: PR (left; y-axis fitted to the data, the random classifier's
  precision = anomaly fraction as a dashed line) and ROC (right; chance diagonal, FPR95 marked per curve where
  TPR = 0.95). A colour per method and a line style per model, so > 10 curves stay distinguishable.
* :func:`heatmap_png` — the image and the anomaly score overlaid (1st–99th percentile stretch, stated on the colour
  bar), the ground-truth anomaly outline in cyan, refined object masks (S2M) outlined in lime when given.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from oodseg.report.tables import dataset_title, method_label, select_rows

STYLES = ("-", "--", ":", "-.")


def _png(fig: Any) -> bytes:
    """PNG bytes at 110 dpi. The figures set fixed margins (their layout never changes) instead of ``tight_layout``
    or ``bbox_inches="tight"``, which measure every text box by rendering it; zlib level 1 (faster, slightly larger
    files; the numbers: ``benchmarks/README.md``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return buf.getvalue()


def _fpr95_point(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """The first ROC point with TPR ≥ 0.95 (the FPR95 operating point)."""
    hit = np.flatnonzero(np.asarray(y) >= 0.95)
    return (float(x[hit[0]]), float(y[hit[0]])) if hit.size else None


def curves_figure(curves: pd.DataFrame, metrics: pd.DataFrame, title: str) -> bytes:
    """PR + ROC panels of one dataset as PNG bytes."""
    fig, (ax_pr, ax_roc) = plt.subplots(1, 2, figsize=(12, 4.8))
    fig.subplots_adjust(left=0.055, right=0.985, bottom=0.1, top=0.93, wspace=0.15)
    methods = sorted({(r.scorer, r.placement, r.temperature) for r in curves.itertuples()}, key=str)
    colours = dict(zip(methods, itertools.cycle(plt.get_cmap("tab20").colors)))
    styles = dict(zip(sorted(set(curves.model)), itertools.cycle(STYLES)))
    plain = all(t == 1.0 and p == "cl" for _, p, t in methods)
    y_max = 0.0
    for (model, scorer, placement, temp), g in curves.groupby(["model", "scorer", "placement", "temperature"]):
        m = metrics[(metrics.model == model) & (metrics.scorer == scorer) & (metrics.placement == placement)
                    & (metrics.temperature == temp)]
        label = f"{model}/{method_label(scorer, placement, temp, plain)}"
        kw = {"color": colours[(scorer, placement, temp)], "ls": styles[model], "lw": 1.2}
        for r in g.itertuples(index=False):
            x, y = np.asarray(r.x), np.asarray(r.y)
            if r.curve == "pr":
                y_max = max(y_max, float(y.max()))
                ax_pr.plot(x, y, label=label + (f" AP {100 * m.auprc.iloc[0]:.1f}" if len(m) else ""), **kw)
            else:
                ax_roc.plot(x, y, label=label + (f" FPR95 {100 * m.fpr95.iloc[0]:.1f}" if len(m) else ""), **kw)
                point = _fpr95_point(x, y)
                if point:
                    ax_roc.plot(*point, marker="o", ms=4, color=kw["color"])
    frac = float(metrics.anomaly_fraction.dropna().iloc[0]) if metrics.anomaly_fraction.notna().any() else None
    if frac is not None:
        ax_pr.axhline(frac, color="0.4", ls="--", lw=0.8, label=f"random ({100 * frac:.2f} %)")
    ax_pr.set(xlabel="recall", ylabel="precision", title=f"{title}: precision-recall", xlim=(0, 1),
              ylim=(0, min(1.02, 1.1 * max(y_max, frac or 0.0, 0.05))))
    ax_roc.plot([0, 1], [0, 1], color="0.6", ls=":", lw=0.8, label="chance")
    ax_roc.axhline(0.95, color="0.8", lw=0.6)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: ROC (• = FPR95 point)",
               xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_pr, ax_roc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(methods) * len(styles) > 10 else 1)
    return _png(fig)


def plot_curves(store: Any, runs: Sequence[str] | None = None, out_dir: str = "plots/report") -> list[str]:
    """One PNG per dataset under ``<results>/<out_dir>/``; returns the written paths."""
    metrics, _ = select_rows(store, runs)
    metrics = metrics[metrics.kind == "anomaly"]
    if metrics.empty:
        return []
    curves = store.duckdb().execute(
        "SELECT model, dataset, scorer, placement, temperature, curve, x, y, run_id FROM curves "
        "WHERE run_id IN (SELECT unnest(?))", [sorted(set(metrics.run_id))]).df()
    keep = set(zip(metrics.run_id, metrics.model, metrics.dataset, metrics.scorer, metrics.placement,
                   metrics.temperature))
    kept = np.array([k in keep for k in zip(curves.run_id, curves.model, curves.dataset, curves.scorer,
                                            curves.placement, curves.temperature)], dtype=bool)
    curves = curves[kept]  # a boolean array, also when empty (an empty list would select no column)
    written = []
    for dataset, group in curves.groupby("dataset"):
        png = curves_figure(group, metrics[metrics.dataset == dataset], dataset_title(dataset))
        written.append(store.write_bytes(f"{out_dir}/curves_{dataset}.png", png))
    return written


def heatmap_png(image: np.ndarray, score: np.ndarray, label: np.ndarray | None = None, title: str = "",
                masks: np.ndarray | None = None) -> bytes:
    """PNG bytes of the image and its anomaly-score overlay."""
    lo, hi = np.percentile(score, [1, 99])
    norm = np.clip((score - lo) / max(hi - lo, 1e-12), 0, 1)
    panel = 11 * (0.92 - 0.01) / 2.03  # inches per panel: 11-inch figure, margins and wspace below
    height = panel * image.shape[0] / image.shape[1] + 0.55  # the panels + 0.5 in for the title lines
    fig, axes = plt.subplots(1, 2, figsize=(11, height))
    fig.subplots_adjust(left=0.01, right=0.92, bottom=0.05 / height, top=1 - 0.5 / height, wspace=0.03)
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    im = axes[1].imshow(norm, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
    if label is not None and (label == 1).any():
        axes[1].contour(label == 1, levels=[0.5], colors="cyan", linewidths=0.9)
    if masks is not None and masks.any():
        axes[1].contour(masks.astype(float), levels=[0.5], colors="lime", linewidths=0.9)
    legend = "cyan: ground-truth anomaly" + ("; lime: refined masks" if masks is not None else "")
    axes[1].set_title(f"{title}\n{legend}" if title else legend, fontsize=9)
    for ax in axes:
        ax.axis("off")
    bar = fig.colorbar(im, ax=axes[1], fraction=0.025, pad=0.01)
    bar.set_label(f"score, 1st–99th pct. stretch\n[{lo:.3g}, {hi:.3g}]", fontsize=7)
    return _png(fig)
