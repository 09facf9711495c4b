"""Cost of the S2M refine stage (score maps → box prompts → SAM masks) vs the score stage, in one benchmark run.

    python benchmarks/refine.py                          # CPU default: 2 sets x 8 images of 128x256, tiny models
    python benchmarks/refine.py --images 32 --sam-size 512 --sam-hidden 128 --sam-layers 6
    python benchmarks/refine.py --sam facebook/sam-vit-base --image-size 512 1024 --images 32 --num-cpus 0   # GPU

Builds a synthetic suite in a temporary directory, saves a randomly initialised tiny ERFNet and a tiny random SAM
(``create_sam("tiny", ...)`` + ``save_sam``; or ``--sam`` any ``create_sam`` source: a hub id such as
``facebook/sam-vit-base``, a local transformers directory, a ``.safetensors``), and runs ``run_benchmark`` with
``refine="s2m"`` (the ``components`` prompter at each set's own best-F1 threshold; MSP only), as
``tests/test_pipeline.py`` configures it. Prints images/s of the score stage and of the s2m stage and the ratio
refine/score (how much slower refining is than scoring), twice:

* from the ``metrics`` table: a stage's images over its largest per-unit ``wall_s`` (every unit of a stage starts
  its clock at the stage's start, so the largest is the stage's wall time: actor start-up, the pass, the component
  pass and the commits);
* from the row stream (``TimedRunner`` of ``benchmarks/pipeline.py``): images after the stage's first batch over
  the time to its last batch (start-up excluded).

Also how many refined images got at least one box (SAM ran on them). Weights are random: only the timing is
meaningful. Ray is shut down at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from common import bench_suite  # benchmarks/common.py: the script's own folder is on sys.path
from pipeline import TimedRunner  # benchmarks/pipeline.py (this script's folder is on sys.path)

from oodseg.models import create_model, save_safetensors
from oodseg.models.sam import create_sam, save_sam
from oodseg.platform.benchmark import BenchmarkConfig, ModelSpec, RefineSpec
from oodseg.platform.results import ResultsStore
from oodseg.platform.runs import init_ray


def sam_source(a: argparse.Namespace, work: Path) -> str:
    """``--sam``, or a tiny random SAM saved with ``save_sam`` (the benchmark needs a file or an id)."""
    if a.sam != "tiny":
        return a.sam
    torch.manual_seed(1)
    sam = create_sam("tiny", image_size=a.sam_size, hidden=a.sam_hidden, layers=a.sam_layers, heads=a.sam_heads)
    return str(save_sam(sam, work / "sam.safetensors"))


def stage_table(results: str, run_id: str) -> dict[str, dict[str, float]]:
    """Per stage: images and wall seconds (largest per-unit ``wall_s``) from the ``metrics`` table."""
    m = ResultsStore(results).read("metrics")
    m = m[m.run_id == run_id]
    out = {}
    for stage, rows in m.groupby(m.stage.fillna("score")):
        units = rows.drop_duplicates("dataset")
        out[str(stage)] = {"images": float(units.n_images.sum()), "wall_s": float(units.wall_s.max())}
    return out


def boxed_images(results: str, run_id: str) -> tuple[int, int]:
    """(refined images whose map is non-zero, refined images): a non-zero map means ≥ 1 box, so SAM ran."""
    p = ResultsStore(results).read("per_image")
    p = p[(p.run_id == run_id) & (p.stage == "s2m")]
    return int((p.score_max > 0).sum()), len(p)


def run(cfg: BenchmarkConfig) -> TimedRunner:
    """One benchmark run under :class:`TimedRunner`; Ray is shut down afterwards."""
    import ray

    try:
        init_ray(cfg.ray_address, cfg.num_cpus)
        runner = TimedRunner(cfg)
        runner.run()
    finally:
        ray.shutdown()
    return runner


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    p.add_argument("--images", type=int, default=8, help="images per synthetic anomaly set")
    p.add_argument("--datasets", nargs="+", default=["road_anomaly_21", "fs_static"])
    p.add_argument("--channels", type=int, nargs=3, default=[8, 16, 32], help="ERFNet stage widths (published: "
                   "16 64 128)")
    p.add_argument("--sam", default="tiny", help="tiny | hub id (facebook/sam-vit-base) | local dir | .safetensors")
    p.add_argument("--sam-size", type=int, default=256, help="tiny SAM input size (multiple of 16)")
    p.add_argument("--sam-hidden", type=int, default=64)
    p.add_argument("--sam-layers", type=int, default=4)
    p.add_argument("--sam-heads", type=int, default=4)
    p.add_argument("--min-area", type=int, default=16, help="components prompter: smallest component (pixels)")
    p.add_argument("--batch-size", type=int, default=4, help="images per score call (= per score shard)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (0: all)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        suite = bench_suite(work, a.image_size, a.images)
        torch.manual_seed(0)
        ckpt = save_safetensors(create_model("erfnet", channels=list(a.channels), input_size=None),
                                work / "model.safetensors")
        cfg = BenchmarkConfig(
            results=str(work / "results"), data_root=str(suite), models=(ModelSpec("bench", checkpoint=str(ckpt)),),
            datasets=tuple(a.datasets), scorers=("msp",), temperatures=(1.0,), batch_size=a.batch_size,
            refine="s2m", refine_cfg=RefineSpec(prompter="components", prompter_cfg={"min_area": a.min_area},
                                                sam=sam_source(a, work), scorers=("msp",)),
            heatmaps=0, plots=False, cache_outputs=False, progress=False, num_cpus=a.num_cpus, device=a.device)
        runner = run(cfg)
        table = stage_table(cfg.results, runner.run_id)
        boxed, refined = boxed_images(cfg.results, runner.run_id)
    print(f"ERFNet channels {a.channels}, SAM {a.sam}, {len(a.datasets)} sets, images {a.image_size[0]}x"
          f"{a.image_size[1]}, {refined} refined images ({boxed} with ≥ 1 box)", file=sys.stderr)
    report(table, runner)
    return 0


def report(table: dict[str, dict[str, float]], runner: TimedRunner) -> None:
    """The two images/s lines per stage and the refine/score ratios."""
    rate = {s: v["images"] / v["wall_s"] for s, v in table.items()}
    steady = {s: t.steady_rate for s, t in runner.streams.items()}
    for stage in ("score", "s2m"):
        t = runner.streams[stage]
        print(f"{stage:>5} stage: {rate[stage]:7.2f} images/s (metrics wall_s {table[stage]['wall_s']:.1f} s for "
              f"{table[stage]['images']:.0f} images); {steady[stage]:7.2f} images/s after its first batch (rows at "
              f"{t.first_s:.1f}..{t.last_s:.1f} s)")
    print(f"ratio refine/score (s2m images/s ÷ score images/s; < 1: refining is slower): "
          f"{rate['s2m'] / rate['score']:.2f} from wall_s, {steady['s2m'] / steady['score']:.2f} after the first batch")


if __name__ == "__main__":
    raise SystemExit(main())
