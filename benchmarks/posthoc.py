"""Extra cost per image of each post-hoc scorer, as a ratio to the bare forward pass, measured in one run.

    python benchmarks/posthoc.py                          # demo ERFNet (width 0.375, 128×256), batch 8, 1 thread
    python benchmarks/posthoc.py --image-size 512 1024 --width 1 --batch-size 2 --threads 2

Model: ERFNet with random weights at the demo configuration (``width=0.375``, ``input_size`` = the image size);
only the timing is meaningful. Fit states are fitted first on ``--fit-batches`` random batches (their cost per image
is printed too, as a ratio to the forward pass). Then, taking turns in each of ``--reps`` rounds (the machine's speed
drifts), it times:

* ``forward``: ``model.predict(images)``, the baseline;
* ``forward+features``: ``model.predict(images, features=True)`` (the extra cost of exposing features);
* each method alone: ``score_many(outputs_with_features, [scorer], model=, images=)`` (the scorer's own work on
  top of the forward pass: class scores at the label size, its map, its blur; ODIN's extra forward + backward +
  forward); ``energy`` and ``msp`` are the existing logit scorers for scale;
* ``all``: one ``predict(features=True)`` and one ``score_many`` over every method (what a scoring actor does).

Prints per row the median ms per image and the ratio to ``forward`` (for a method: extra cost / forward).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from oodseg.models import create_model
from oodseg.scoring import SCORERS, create_fit, create_scorer, score_many

METHODS = ("msp", "energy", "gen", "energy_blur", "sml", "mahalanobis", "knn", "react", "odin")


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fitted(model: Any, batches: list[torch.Tensor], labels: torch.Tensor) -> tuple[dict[str, Any], float]:
    """Every fit state the methods need, fitted on ``batches``; seconds spent (forward passes included)."""
    names = {SCORERS.meta(m)["fit"] for m in METHODS} - {None}
    states = {n: create_fit(n, **({"num_classes": model.num_classes} if n in ("class_gaussians", "feature_bank")
                                  else {})) for n in names}
    t0 = time.perf_counter()
    for i, images in enumerate(batches):
        with torch.inference_mode():
            out = model.predict(images, features=True)
        ids = [f"train{i}-{b}" for b in range(len(images))]
        for state in states.values():
            state.update(out, labels, ids)
    return states, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, w = args.image_size
    model = create_model("erfnet", width=args.width, input_size=[h, w], dropout=[0.0, 0.0]).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, h, w, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, model.num_classes, (args.batch_size, h, w), generator=g).to(torch.uint8)
    train = [torch.randint(0, 256, images.shape, generator=g, dtype=torch.uint8) for _ in range(args.fit_batches)]
    states, fit_s = fitted(model, train, labels)
    scorers = {m: create_scorer(m, fit=states.get(SCORERS.meta(m)["fit"])) for m in METHODS}
    with torch.inference_mode():
        out = model.predict(images, features=True)
    jobs = {"forward": lambda: model.predict(images), "forward+features": lambda: model.predict(images, features=True)}
    for m, s in scorers.items():
        jobs[m] = lambda s=s: score_many(out, [s], (h, w), model=model, images=images)
    jobs["all"] = lambda: score_many(model.predict(images, features=True), list(scorers.values()), (h, w),
                                     model=model, images=images)
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(args.reps + 1):  # round 0 warms up
        for name, job in jobs.items():
            with torch.inference_mode(name in ("forward", "forward+features")):
                dt = timed(job)
            if r:
                times[name].append(dt / args.batch_size)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["fit"] = fit_s / (args.fit_batches * args.batch_size)
    return med


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, nargs=2, default=[128, 256])
    p.add_argument("--width", type=float, default=0.375)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a scoring actor's default: 1)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--fit-batches", type=int, default=2)
    args = p.parse_args(argv)
    med = run(args)
    base = med["forward"]
    print(f"ERFNet width {args.width}, {args.image_size[0]}x{args.image_size[1]}, batch {args.batch_size}, "
          f"{args.threads} thread(s), median of {args.reps} rounds")
    print(f"{'row':<18}{'ms/image':>10}{'ratio':>9}")
    for name, sec in med.items():
        print(f"{name:<18}{sec * 1e3:>10.2f}{sec / base:>9.2f}")
    return med


if __name__ == "__main__":
    main()
