"""``react``: rectified activations (Sun et al., "ReAct: Out-of-distribution Detection With Rectified
Activations", NeurIPS 2021; deeplearning-wisc/react, OpenOOD's ``react_postprocessor``).

Fit: the ``p``-th percentile (default 90) of all activations of the penultimate features on the training split,
flattened over channels and pixels (the reference's ``np.percentile(activation_log.flatten(), p)``). The state is
the exact histogram of the activations rounded to ``2^-10`` (:mod:`.exact`; a sparse ``value → count`` map whose
merge adds counts), so any percentile is read off after the fit (Tune's ``percentile``) and equals
``np.percentile`` of the rounded activations.

Score: the features clipped from above at that threshold, ``f̄ = min(f, c)``, go through the model's own classifier
again (``model.classify(f̄, size)``; no second backbone pass) and the anomaly score is the free energy of the new
logits, ``−T · logsumexp(L̄ / T)`` (the reference's confidence is ``logsumexp``) at the label size. Needs the network
(its classifier) and features: per-pixel models with ``classify``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from oodseg.scoring.context import ScoreContext
from oodseg.scoring.posthoc import exact
from oodseg.scoring.posthoc.fit import FitState, register_fit
from oodseg.scoring.scorers import energy, register_scorer


@register_fit("activation_histogram", features=True)
class ActivationHistogram(FitState):
    """Sparse exact histogram of the rounded feature activations."""

    def __init__(self) -> None:
        self.values = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)

    def config(self) -> dict[str, Any]:
        return {}

    def _update(self, outputs: Any, labels: torch.Tensor, ids: list[str]) -> None:
        self._add(*exact.value_counts(exact.quantise(outputs.features)))

    def _add(self, values: np.ndarray, counts: np.ndarray) -> None:
        self.values, self.counts = exact.merge_counts(self.values, self.counts, values, counts)

    def _merge(self, other: ActivationHistogram) -> None:
        self._add(other.values, other.counts)

    def _state(self) -> dict[str, Any]:
        return {"values": self.values.copy(), "counts": self.counts.copy()}

    def _load(self, state: Any) -> None:
        self.values = np.asarray(state["values"], np.int64)
        self.counts = np.asarray(state["counts"], np.int64)

    def threshold(self, percentile: float) -> float:
        if not 0 <= percentile <= 100:
            raise ValueError(f"react: percentile must be in [0, 100], got {percentile}")
        return self.cached(f"p{percentile}", lambda: exact.percentile(self.values, self.counts, percentile))


@register_scorer("react", space={"percentile": {"type": "choice", "values": [80, 85, 90, 95, 99]},
                                 "temperature": {"type": "loguniform", "low": 0.05, "high": 20.0}},
                 reads="map", fit="activation_histogram", needs=("features", "network"), kinds=("pixel",))
def react(ctx: ScoreContext, temperature: float, percentile: float = 90.0) -> torch.Tensor:
    """Energy of the logits of the clipped features."""
    f = ctx.features("react")
    model = ctx.network("react", images=False)
    c = ctx.fitted("react").threshold(float(percentile))
    with torch.no_grad():  # features from an autocast pass may be bf16: the classifier runs in its own dtype
        clipped = f.to(next(model.parameters()).dtype).clamp(max=c)
        logits = model.classify(clipped, tuple(ctx.outputs.logits.shape[-2:]))
    z = ctx.logits_at_size(logits)
    return energy(z / temperature, temperature)
