"""Cost of one temperature-search trial (scoring cached outputs) vs one forward pass over the same images.

    python benchmarks/tune.py                                   # ERFNet width 1.0 at 256×512, 8 images, this machine
    python benchmarks/tune.py --width 1.0 --input-size 512 1024 --images 16

Builds (once) a synthetic suite at the requested size, saves a randomly initialised ERFNet of the requested width,
runs the temperature job in grid mode on an empty results store (which runs the benchmark once to create the output
cache), then again on the filled store with ``time_forward`` so the forward pass is timed separately with
``model.predict`` over the validation images. Prints the job's table and the per-trial vs forward timing line
(target: a trial ≤ 10 % of a forward pass). Weights are random: only the timing is meaningful.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from oodseg.models import create_model, save_safetensors
from oodseg.platform.pipeline import ModelSpec
from oodseg.platform.tune_temperature import TemperatureSearchConfig, format_result, run_temperature_search


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=1.0, help="ERFNet width multiplier")
    ap.add_argument("--input-size", type=int, nargs=2, default=(256, 512), help="suite image size H W")
    ap.add_argument("--images", type=int, default=8, help="validation images")
    ap.add_argument("--out", default="", help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)

    from oodseg.data.synthetic import ensure_suite

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        size = tuple(args.input_size)
        suite = ensure_suite(work / f"suite-{size[0]}x{size[1]}", seed=0, size=size, n_train=2, n_val=2,
                             n_anomaly=args.images, n_coco=2)
        torch.manual_seed(0)
        model = create_model("erfnet", width=args.width, input_size=None)
        ckpt = save_safetensors(model, work / f"erfnet-w{args.width}.safetensors")
        base = dict(results=str(work / "results"), data_root=str(suite), model=ModelSpec("bench", checkpoint=str(ckpt)),
                    val_set="road_anomaly_21", datasets=("road_anomaly_21",), search="grid", trial_cpus=1.0)
        run_temperature_search(TemperatureSearchConfig(**base, time_forward=False))  # creates the output cache
        cfg = TemperatureSearchConfig(**base, time_forward=True)
        print(format_result(run_temperature_search(cfg), cfg), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
