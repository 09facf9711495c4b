"""The temperature-search job (``python jobs/tune_temperature.py`` / ``python -m oodseg tune-temperature``): find or
create the benchmark's output cache → one Tune study per placement → the grid rows and the best T on every set."""

from __future__ import annotations

from oodseg.config import parse_config
from oodseg.platform.cli import run_cli
from oodseg.platform.tuning.temperature import TemperatureSearchConfig, format_result, run_temperature_search


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TemperatureSearchConfig, argv, prog="python jobs/tune_temperature.py", description=__doc__)

    def body() -> int:
        print(format_result(run_temperature_search(cfg), cfg), flush=True)
        return 0

    return run_cli(body)
