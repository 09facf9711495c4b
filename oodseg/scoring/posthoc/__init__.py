"""Post-hoc scorers that learn from the training split or look inside the network, each one file + registration:

* ``gen`` (:mod:`.gen`): generalized entropy of the softmax (logits only);
* ``energy_blur`` (:mod:`.energy_blur`): S2M's blurred energy (logits only);
* ``sml`` (:mod:`.sml`): standardized max logits (fit: per-class max-logit moments);
* ``mahalanobis`` (:mod:`.mahalanobis`): class-conditional Gaussians of features (fit: class sums + shared Gram);
* ``knn`` (:mod:`.knn`): k-th nearest training feature (fit: a seeded, capped feature bank);
* ``react`` (:mod:`.react`): energy of the logits of clipped features (fit: activation histogram; runs the classifier);
* ``odin`` (:mod:`.odin`): temperature + input perturbation (runs the network: forward, backward, forward).

Fit states (:mod:`.fit`) merge exactly and in any order (:mod:`.exact`); ``create_fit(name)`` /
``fit_from_state(name, state)``; which one a scorer needs is its registration's ``fit`` fact.
"""

from oodseg.scoring.posthoc import energy_blur, gen, knn, mahalanobis, odin, react, sml  # noqa: F401 (registration)
from oodseg.scoring.posthoc.fit import FITS, FitState, create_fit, fit_from_state, fit_reads_features, register_fit

__all__ = ["FITS", "FitState", "create_fit", "fit_from_state", "fit_reads_features", "register_fit"]
