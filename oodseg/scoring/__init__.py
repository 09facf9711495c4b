"""Anomaly scorers for both model output kinds and mergeable metrics (no Ray, no model code).

Scorers: :func:`create_scorer`, :func:`list_scorers`, :func:`register_scorer`, :func:`scorer_space`,
:func:`pixel_class_scores`, :func:`score_many`. Metrics live in :mod:`oodseg.scoring.metrics`.
"""

from oodseg.scoring.scorers import (
    SCORERS,
    Scorer,
    create_scorer,
    list_scorers,
    pixel_class_scores,
    register_scorer,
    score_many,
    scorer_space,
)

__all__ = [
    "SCORERS",
    "Scorer",
    "create_scorer",
    "list_scorers",
    "pixel_class_scores",
    "register_scorer",
    "score_many",
    "scorer_space",
]
