"""The standard results table and plots, read from the Parquet results store with DuckDB.

Table: rows = model × method (scorer, plus placement/temperature when not the default), columns = SMIYC RA-21,
SMIYC RO-21, FS L&F, FS Static, Road Anomaly (AuPRC, FPR95, in %) and Cityscapes mIoU (per model). Plots:
PR and ROC curves per dataset (from the downsampled ``curves`` table) and anomaly heatmap overlays for chosen
images (score maps recomputed from the run's fp16 output cache, see :mod:`oodseg.platform.cache`).

README one-liner (any DuckDB; the Parquet parts are plain files)::

    python -c "import duckdb; duckdb.sql(\\"SELECT model, dataset, scorer, round(100*auprc,1) AS auprc, round(100*fpr95,1) AS fpr95, round(100*miou,1) AS miou FROM 'results/metrics/*.parquet' ORDER BY dataset, auprc DESC\\").show()"
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: registry dataset name → column title of the standard table, in table order
COLUMNS: dict[str, str] = {
    "road_anomaly_21": "SMIYC RA-21",
    "road_obstacle_21": "SMIYC RO-21",
    "fs_lost_found": "FS L&F",
    "fs_static": "FS Static",
    "road_anomaly": "Road Anomaly",
}
SEMANTIC_COLUMN = ("cityscapes", "Cityscapes mIoU")


def open_store(results: str):
    """The results store at ``results`` (imported lazily: ``oodseg.platform`` is the only Ray-importing layer,
    but its results module itself needs only pyarrow)."""
    from oodseg.platform.results import ResultsStore

    return ResultsStore(results)


def latest_run(con) -> str | None:
    """The run id with the most recently committed metrics."""
    row = con.execute(
        "SELECT run_id FROM metrics GROUP BY run_id ORDER BY max(committed_at) DESC LIMIT 1"
    ).fetchone()
    return row[0] if row else None


def method_label(scorer: str, placement: str | None, temperature: float | None, plain: bool) -> str:
    if plain or temperature is None:
        return scorer
    return f"{scorer} ({placement}, T={temperature:g})"


def standard_table(store, run_id: str | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The standard table as a DataFrame (values in %) plus ``info`` (run id, anomaly fraction per dataset, …)."""
    con = store.duckdb()
    run_id = run_id or latest_run(con)
    info: dict[str, Any] = {"run_id": run_id, "anomaly_fraction": {}, "n_images": {}}
    if run_id is None:
        return pd.DataFrame(), info
    anomaly = con.execute(
        """
        SELECT model, scorer, placement, temperature, dataset, auprc, fpr95, auroc, siou, ppv, mean_f1,
               anomaly_fraction, n_images
        FROM metrics WHERE run_id = ? AND kind = 'anomaly' AND scorer IS NOT NULL
        """,
        [run_id],
    ).df()
    semantic = con.execute(
        "SELECT model, dataset, miou, n_images FROM metrics WHERE run_id = ? AND kind = 'semantic'", [run_id]
    ).df()
    if anomaly.empty and semantic.empty:
        return pd.DataFrame(), info
    plain = bool(((anomaly["temperature"] == 1.0) & (anomaly["placement"] == "cl")).all())
    datasets = [d for d in COLUMNS if d in set(anomaly["dataset"])] + sorted(
        set(anomaly["dataset"]) - set(COLUMNS)
    )
    rows: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for r in anomaly.itertuples(index=False):
        key = (r.model, method_label(r.scorer, r.placement, r.temperature, plain))
        cell = rows.setdefault(key, {})
        title = COLUMNS.get(r.dataset, r.dataset)
        cell[(title, "AuPRC")] = 100 * r.auprc if r.auprc is not None else math.nan
        cell[(title, "FPR95")] = 100 * r.fpr95 if r.fpr95 is not None else math.nan
        info["anomaly_fraction"][title] = r.anomaly_fraction
        info["n_images"][title] = r.n_images
    miou = {r.model: 100 * r.miou if r.miou is not None else math.nan for r in semantic.itertuples(index=False)}
    for r in semantic.itertuples(index=False):
        info["n_images"][SEMANTIC_COLUMN[1]] = r.n_images
    for model in miou:
        if not any(k[0] == model for k in rows):
            rows[(model, "-")] = {}
    columns = [(COLUMNS.get(d, d), m) for d in datasets for m in ("AuPRC", "FPR95")]
    if miou:
        columns.append((SEMANTIC_COLUMN[1], "mIoU"))
        for (model, _), cells in rows.items():
            cells[columns[-1]] = miou.get(model, math.nan)
    table = pd.DataFrame(
        [[cells.get(c, math.nan) for c in columns] for cells in rows.values()],
        index=pd.MultiIndex.from_tuples(list(rows), names=["model", "method"]),
        columns=pd.MultiIndex.from_tuples(columns),
    )
    return table.sort_index(), info


def component_table(store, run_id: str) -> pd.DataFrame:
    """SMIYC component metrics (sIoU, PPV, mean F1 in %, at each method's pixel best-F1 threshold) per dataset."""
    df = store.duckdb().execute(
        """
        SELECT model, scorer, placement, temperature, dataset, 100 * siou AS sIoU, 100 * ppv AS PPV,
               100 * mean_f1 AS mF1
        FROM metrics WHERE run_id = ? AND kind = 'anomaly' AND scorer IS NOT NULL
        """,
        [run_id],
    ).df()
    if df.empty:
        return df
    plain = bool(((df["temperature"] == 1.0) & (df["placement"] == "cl")).all())
    df["method"] = [method_label(s, p, t, plain) for s, p, t in zip(df.scorer, df.placement, df.temperature)]
    df["dataset"] = [COLUMNS.get(d, d) for d in df.dataset]
    wide = df.pivot_table(index=["model", "method"], columns="dataset", values=["sIoU", "PPV", "mF1"],
                          dropna=False).swaplevel(0, 1, axis=1)
    order = [COLUMNS[d] for d in COLUMNS if COLUMNS[d] in set(df.dataset)] + sorted(
        set(df.dataset) - set(COLUMNS.values()))
    return wide.reindex(columns=[(d, m) for d in order for m in ("sIoU", "PPV", "mF1")])


def format_table(table: pd.DataFrame, info: dict[str, Any]) -> str:
    """Plain-text rendering (one decimal), with the anomaly pixel fraction of each dataset as the last line."""
    if table.empty:
        return "no results"
    lines = [f"run {info['run_id']}   (AuPRC / FPR95 / mIoU in %; higher AuPRC, lower FPR95 is better)"]
    text = table.to_string(float_format=lambda v: f"{v:5.1f}", na_rep="  -  ", sparsify=True)
    lines.append(text)
    if info["anomaly_fraction"]:
        frac = ", ".join(f"{k} {100 * v:.2f}%" for k, v in info["anomaly_fraction"].items() if v is not None)
        lines.append(f"anomaly pixel fraction (AuPRC of a random scorer): {frac}")
    if info["n_images"]:
        lines.append("images: " + ", ".join(f"{k} {v}" for k, v in info["n_images"].items()))
    return "\n".join(lines)


def format_components(table: pd.DataFrame) -> str:
    if table.empty or table.isna().all().all():
        return ""
    text = table.to_string(float_format=lambda v: f"{v:5.1f}", na_rep="  -  ", sparsify=True)
    return "component level (SMIYC; %, at the pixel best-F1 threshold):\n" + text


# ------------------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_curves(store, run_id: str) -> list[str]:
    """One PNG per dataset (PR left, ROC right, a line per model × method) under ``plots/<run_id>/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    con = store.duckdb()
    curves = con.execute(
        "SELECT model, dataset, scorer, placement, temperature, curve, x, y FROM curves WHERE run_id = ?", [run_id]
    ).df()
    metrics = con.execute(
        "SELECT model, dataset, scorer, placement, temperature, auprc, fpr95, auroc FROM metrics "
        "WHERE run_id = ? AND kind = 'anomaly'", [run_id]
    ).df()
    written = []
    for dataset, group in curves.groupby("dataset"):
        fig, (ax_pr, ax_roc) = plt.subplots(1, 2, figsize=(11, 4.5))
        for (model, scorer, placement, temp), g in group.groupby(["model", "scorer", "placement", "temperature"]):
            m = metrics[(metrics.model == model) & (metrics.dataset == dataset) & (metrics.scorer == scorer)
                        & (metrics.placement == placement) & (metrics.temperature == temp)]
            label = f"{model}/{method_label(scorer, placement, temp, temp == 1.0 and placement == 'cl')}"
            for r in g.itertuples(index=False):
                if r.curve == "pr":
                    ap = f" AP={100 * m.auprc.iloc[0]:.1f}" if len(m) else ""
                    ax_pr.plot(r.x, r.y, label=label + ap)
                else:
                    auc = f" AUROC={100 * m.auroc.iloc[0]:.1f}" if len(m) else ""
                    ax_roc.plot(r.x, r.y, label=label + auc)
        title = COLUMNS.get(dataset, dataset)
        ax_pr.set(xlabel="recall", ylabel="precision", title=f"{title}: precision-recall", xlim=(0, 1), ylim=(0, 1.02))
        ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: ROC",
                   xlim=(0, 1), ylim=(0, 1.02))
        ax_roc.axvline(0.0, color="0.8", lw=0.5)
        for ax in (ax_pr, ax_roc):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(store.write_bytes(f"plots/{run_id}/curves_{dataset}.png", _png(fig)))
    return written


def save_heatmap(image: np.ndarray, score: np.ndarray, label: np.ndarray | None = None, title: str = "") -> bytes:
    """PNG bytes: the image, and the anomaly score overlaid (1st–99th percentile stretch) with the GT outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(score, [1, 99])
    norm = np.clip((score - lo) / max(hi - lo, 1e-12), 0, 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 10 * image.shape[0] / (2 * image.shape[1]) + 0.6))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    axes[1].imshow(norm, cmap="inferno", alpha=0.6)
    if label is not None and (label == 1).any():
        axes[1].contour(label == 1, levels=[0.5], colors="cyan", linewidths=0.8)
    axes[1].set_title(title or "anomaly score")
    for ax in axes:
        ax.axis("off")
    return _png(fig)


def heatmaps_from_cache(
    store, run_id: str, model: str, dataset: str, image_ids: Sequence[str], scorer: str = "msp",
    temperature: float = 1.0, placement: str = "cl", data_root: str | None = None,
) -> list[str]:
    """Heatmap PNGs for chosen images: scores recomputed from the run's output cache, image read from the dataset."""
    import torch

    from oodseg.data import create_dataset
    from oodseg.platform.cache import ShardCache
    from oodseg.scoring import create_scorer

    cache = ShardCache(store.root, run_id, model, dataset, "outputs")
    if not cache.shards():
        raise FileNotFoundError(
            f"no output cache for run {run_id} model {model} dataset {dataset} under {cache.dir}; "
            "rerun the benchmark with cache_outputs=true"
        )
    if data_root is None:
        runs = store.duckdb().execute(
            "SELECT config_json FROM runs WHERE run_id = ? ORDER BY started_at DESC LIMIT 1", [run_id]
        ).fetchone()
        cfg = json.loads(runs[0]) if runs else {}
        data_root = cfg.get("data_root") or None
        if not data_root:
            from oodseg.platform.pipeline import default_cache_dir, synthetic_suite

            cache_dir = cfg.get("cache_dir") or str(default_cache_dir())
            data_root = str(synthetic_suite(Path(cache_dir), int(cfg.get("seed", 0))))
    ds = create_dataset(dataset, root=data_root, strict=False)
    refs = {r.id: r for r in ds.samples}
    fn = create_scorer(scorer, temperature=temperature, placement=placement)
    wanted, written, found = set(image_ids), [], set()
    for item in cache.items():
        if item.id not in wanted:
            continue
        found.add(item.id)
        score = fn(item.outputs.to(dtype=torch.float32), size=tuple(item.label.shape))[0].numpy()
        image = ds.load(refs[item.id])["image"]
        data = save_heatmap(image, score, item.label, title=f"{dataset} {item.id} {scorer} T={temperature:g}")
        written.append(store.write_bytes(f"plots/{run_id}/heatmaps/{model}__{dataset}__{item.id}__{scorer}.png", data))
    missing = wanted - found
    if missing:
        raise KeyError(f"image id(s) {sorted(missing)} not in the output cache of {model}/{dataset}")
    return written


# ------------------------------------------------------------------------------------------------------------------
# CLI: python -m oodseg report
# ------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m oodseg report", description="Print the standard table and draw plots from a results store."
    )
    p.add_argument("--results", default="./results", help="results root (directory or s3://… URI)")
    p.add_argument("--run-id", default=None, help="run to report (default: the latest run with metrics)")
    p.add_argument("--no-plots", action="store_true", help="only print the table")
    p.add_argument("--heatmap", action="append", default=[], metavar="MODEL:DATASET:IMAGE_ID",
                   help="draw an anomaly heatmap for this image from the output cache (repeatable)")
    p.add_argument("--scorer", default="msp", help="scorer for --heatmap")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature for --heatmap")
    p.add_argument("--placement", default="cl", choices=["cl", "pl"], help="temperature placement for --heatmap")
    p.add_argument("--data-root", default=None, help="dataset root for --heatmap (default: from the run's config)")
    p.add_argument("--sql", default=None, help="run this DuckDB query over the tables instead and print it")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    store = open_store(a.results)
    if a.sql:
        print(store.duckdb().sql(a.sql))
        return 0
    table, info = standard_table(store, a.run_id)
    print(format_table(table, info))
    if table.empty:
        return 1
    print(format_components(component_table(store, info["run_id"])))
    if not a.no_plots:
        for path in plot_curves(store, info["run_id"]):
            print(f"plot: {path}")
    for spec in a.heatmap:
        try:
            model, dataset, image_id = spec.split(":", 2)
        except ValueError:
            p.error(f"--heatmap expects MODEL:DATASET:IMAGE_ID, got {spec!r}")
        for path in heatmaps_from_cache(store, info["run_id"], model, dataset, [image_id], a.scorer, a.temperature,
                                        a.placement, a.data_root):
            print(f"heatmap: {path}")
    return 0
