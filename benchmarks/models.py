"""Forward throughput (images/s) of each registered model at its native input size on the current device.

    python benchmarks/models.py                       # real configs (GPU recommended)
    python benchmarks/models.py --small --iters 3     # CPU-friendly configs, see SIZES below
    python benchmarks/models.py --models erfnet --batch-size 4 --precision bf16

Models are randomly initialised (throughput does not depend on the weights). Native sizes:

* ``erfnet``   — the published Cityscapes config, input 512×1024 (its training resolution);
* ``eomt``     — ``EomtForUniversalSegmentation`` with the ViT-L / 1024 config of
  ``tue-mps/cityscapes_semantic_eomt_large_1024`` (hidden 1024, 24 layers, 16 heads, patch 16, 100 queries, last 4
  blocks with queries), one 1024×1024 window per image (a 1024×2048 Cityscapes frame is two windows);
* ``timm_seg`` — ``convnext_atto`` backbone (decoder 128 ch), input 512×1024.

``--small`` (CPU): ERFNet and timm_seg at 256×512; EoMT with a ViT-S-like config (hidden 384, 12 layers, 6 heads,
patch 16, 100 queries, 4 query blocks) at 256×256 windows. Random init of the large EoMT (~300 M parameters, 4096
tokens per window) takes minutes per iteration on a CPU.

Timing: ``--warmup`` untimed forwards, then ``--iters`` timed ones under ``torch.inference_mode`` and the Runtime's
autocast; CUDA is synchronised around the timed region.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from oodseg.models import Runtime, create_model

EOMT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=1024, patch_size=16,
                  num_queries=100, num_blocks=4, num_labels=19)
EOMT_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=256, patch_size=16,
                  num_queries=100, num_blocks=4, num_labels=19)


def specs(small: bool) -> dict[str, tuple[dict[str, Any], tuple[int, int]]]:
    """name → (create_model cfg, input (H, W))."""
    hw = (256, 512) if small else (512, 1024)
    eomt = EOMT_SMALL if small else EOMT_LARGE
    return {
        "erfnet": (dict(), hw),
        "eomt": (dict(config=eomt), (eomt["image_size"], eomt["image_size"])),
        "timm_seg": (dict(backbone="convnext_atto", decoder_channels=128), hw),
        # Mask2Former: RbA's Swin-B with one decoder layer (its zoo model), Swin-T at CPU sizes
        "mask2former": (dict(backbone="swin-t" if small else "swin-b", arch={"decoder_layers": 1}), hw),
    }


def bench(
    name: str, cfg: dict[str, Any], hw: tuple[int, int], rt: Runtime, batch: int, warmup: int, iters: int
) -> dict[str, Any]:
    model = rt.prepare(create_model(name, **cfg)).eval()
    x = torch.randn(batch, 3, *hw, device=rt.torch_device)
    sync = torch.cuda.synchronize if rt.torch_device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), rt.autocast():
        for _ in range(warmup):
            model(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync()
        dt = (time.perf_counter() - t0) / iters
    return dict(
        model=name,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        input=f"{batch}x3x{hw[0]}x{hw[1]}",
        ms_per_batch=dt * 1e3,
        images_per_s=batch / dt,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="erfnet,eomt,timm_seg")
    p.add_argument("--small", action="store_true", help="CPU-friendly configs (see module docstring)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = Runtime(device=args.device, precision=args.precision)
    table = specs(args.small)
    rows = []
    for name in args.models.split(","):
        cfg, hw = table[name]
        rows.append(bench(name, cfg, hw, rt, args.batch_size, args.warmup, args.iters))
    dev = rt.torch_device
    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {devname}   precision: {str(rt.dtype).replace('torch.', '')}   small: {args.small}")
    print(f"{'model':<10} {'params(M)':>9} {'input':>18} {'ms/batch':>10} {'images/s':>9}")
    for r in rows:
        print(
            f"{r['model']:<10} {r['params_m']:>9.2f} {r['input']:>18} "
            f"{r['ms_per_batch']:>10.1f} {r['images_per_s']:>9.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
