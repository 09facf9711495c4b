"""Platform layer, the only one that imports Ray (its modules import it where they use it).

* :mod:`oodseg.platform.benchmark` — the benchmark job on Ray Data (stages: prepare, read, score, reduce,
  components, refine, commit).
* :mod:`oodseg.platform.trainer` — fine-tuning on Ray Train (DeepSpeed / DDP) around ``oodseg.training.loop.fit``.
* :mod:`oodseg.platform.tuning` — Ray Tune searches: temperatures on cached outputs, loss hyper-parameters (ASHA).
* :mod:`oodseg.platform.runs` — run ids, provenance, the ``runs`` row, Ray start-up, the console.
* :mod:`oodseg.platform.results` — the append-only Parquet results store with atomic per-unit commits.
* :mod:`oodseg.platform.cache` — per-run fp16 output / score-map shard caches.
* :mod:`oodseg.platform.cli` — one-line errors and Ctrl-C handling shared by the job CLIs.

Importing this package imports nothing heavy; import the submodule you need.
"""
