"""Anomaly scorers for both model output kinds and mergeable metrics (no Ray, no model code).

Scorers: :func:`create_scorer`, :func:`list_scorers`, :func:`register_scorer`, :func:`scorer_space`,
:func:`scorer_applies`, :func:`score_many`, :func:`default_scorers`; model outputs → class scores:
:func:`pixel_class_scores`. Post-hoc scorers that learn from the training split or run the network, and their
mergeable fit states (:func:`create_fit`, :func:`fit_from_state`): :mod:`oodseg.scoring.posthoc`.
Metrics live in :mod:`oodseg.scoring.metrics`.
"""

from oodseg.scoring.class_scores import pixel_class_scores, semantic_prediction
from oodseg.scoring.context import ScoreContext, ScorerInputError
from oodseg.scoring.posthoc import create_fit, fit_from_state, fit_reads_features
from oodseg.scoring.scorers import (
    PLACEMENTS,
    SCORERS,
    Scorer,
    create_scorer,
    default_scorers,
    list_scorers,
    register_scorer,
    score_many,
    scorer_applies,
    scorer_space,
)

__all__ = [
    "PLACEMENTS",
    "SCORERS",
    "ScoreContext",
    "Scorer",
    "ScorerInputError",
    "create_fit",
    "create_scorer",
    "default_scorers",
    "fit_from_state",
    "fit_reads_features",
    "list_scorers",
    "pixel_class_scores",
    "register_scorer",
    "score_many",
    "scorer_applies",
    "scorer_space",
    "semantic_prediction",
]
