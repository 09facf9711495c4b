"""``python -m oodseg convert-checkpoint [--format FORMAT] …``: one command for every checkpoint format we convert to a
transformers directory. ``--format`` picks the converter (default ``tue-mps-eomt``, the original behaviour); the rest
of the arguments are that converter's own (``--format F --help`` shows them).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: format → (module with ``main(argv) -> int`` and ``parser()``/``_parser()``, model it feeds, what it reads)
FORMATS: dict[str, tuple[str, str, str]] = {
    "tue-mps-eomt": ("oodseg.models.eomt_convert", "eomt", "tue-mps/eomt Lightning .ckpt or pytorch_model.bin: IN OUT"),
    "detectron2-mask2former": (
        "oodseg.models.mask2former_convert",
        "mask2former",
        "detectron2 Mask2Former (Mask2Former / RbA model zoo): MODEL_DIR OUT or CONFIG.yaml MODEL_FINAL.pth OUT",
    ),
}
DEFAULT = "tue-mps-eomt"


def usage() -> str:
    lines = ["usage: python -m oodseg convert-checkpoint [--format FORMAT] ARGS...   (--format FORMAT --help)", "",
             "Convert an outside checkpoint to a transformers directory (load it with pretrained=OUT).", "",
             "formats:"]
    lines += [f"  {name:<24}{desc} -> model {model}{' (default)' if name == DEFAULT else ''}"
              for name, (_, model, desc) in FORMATS.items()]
    return "\n".join(lines)


def _split_format(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--format X`` / ``--format=X`` taken out of ``argv``; ``(None, argv)`` without one."""
    for i, arg in enumerate(argv):
        if arg == "--format" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--format="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    fmt, rest = _split_format(args)
    if fmt is None and any(a in ("-h", "--help") for a in rest):
        print(usage())
        for name, (module, _, _) in FORMATS.items():
            print(f"\n--format {name}:")
            importlib.import_module(module).main(["--help"])
        return 0
    if "--format" in rest:
        print("error: --format needs a value\n\n" + usage(), file=sys.stderr)
        return 2
    fmt = fmt or DEFAULT
    if fmt not in FORMATS:
        print(f"error: unknown --format {fmt!r}; use one of {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(FORMATS[fmt][0]).main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
