"""Stage "s2m" (WIP placeholder while the refine core lands)."""

from __future__ import annotations

from oodseg.platform.benchmark.stage import Stage


class RefineStage(Stage):
    name = "s2m"
    cache_kind = "refined"
    refined = True

    def enabled(self) -> bool:
        return self.run.cfg.refine == "s2m"
