"""``python -m oodseg <command>``: ``report`` (standard table + plots) and ``benchmark`` (the main job)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {
    "report": "print the standard table and draw PR/ROC plots + heatmaps from a results store",
    "benchmark": "run the benchmark job (same as python jobs/benchmark.py)",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print("usage: python -m oodseg {" + ",".join(COMMANDS) + "} [options]\n")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    command, rest = args[0], args[1:]
    if command == "report":
        from oodseg.report import main as report_main

        return report_main(rest)
    from oodseg.platform.pipeline import main as benchmark_main

    return benchmark_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
