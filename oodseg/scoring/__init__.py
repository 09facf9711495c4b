"""Anomaly scorers for both model output kinds and mergeable metrics (no Ray, no model code).

Scorers: :func:`create_scorer`, :func:`list_scorers`, :func:`register_scorer`, :func:`scorer_space`,
:func:`scorer_applies`, :func:`score_many`; model outputs → class scores: :func:`pixel_class_scores`.
Metrics live in :mod:`oodseg.scoring.metrics`.
"""

from oodseg.scoring.class_scores import pixel_class_scores, semantic_prediction
from oodseg.scoring.scorers import (
    PLACEMENTS,
    SCORERS,
    Scorer,
    create_scorer,
    list_scorers,
    register_scorer,
    score_many,
    scorer_applies,
    scorer_space,
)

__all__ = [
    "PLACEMENTS",
    "SCORERS",
    "Scorer",
    "create_scorer",
    "list_scorers",
    "pixel_class_scores",
    "register_scorer",
    "score_many",
    "scorer_applies",
    "scorer_space",
    "semantic_prediction",
]
