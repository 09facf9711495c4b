"""The main job: benchmark every model × dataset × scorer on Ray Data and write Parquet results + plots.

    python jobs/benchmark.py                       # synthetic road suite + demo model (built/cached on first run)
    python jobs/benchmark.py --config configs/benchmark.yaml --set run_id=my-run --results s3://bucket/results
    ray job submit --working-dir . -- python jobs/benchmark.py ...   # on an existing cluster ($RAY_ADDRESS)

Every option: ``python jobs/benchmark.py --help`` (fields of ``oodseg.platform.pipeline.BenchmarkConfig``).
Stages, caches and the resume rule are described in ``oodseg/platform/pipeline.py``.
"""

from oodseg.platform.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
