"""Search a scorer's temperature on the benchmark's cached model outputs with Ray Tune (no forward passes).

    python jobs/tune_temperature.py                                   # MSP, both placements, AuPRC on RoadAnomaly21
    python jobs/tune_temperature.py --config configs/tune_temperature.yaml --set objective=fpr95
    python jobs/tune_temperature.py --search grid                     # the published rows T = 0.5, 0.75, 1.1

Reuses the output cache of the newest matching ``jobs/benchmark.py`` run (``cache_outputs: true``) or runs that
benchmark once to create it. Every option: ``python jobs/tune_temperature.py --help``; design notes in
``oodseg/platform/tune_temperature.py``.
"""

from oodseg.platform.tune_temperature import main

if __name__ == "__main__":
    raise SystemExit(main())
