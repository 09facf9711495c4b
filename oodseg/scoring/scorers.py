"""Per-pixel anomaly scorers for both model output kinds (higher score = more anomalous).

Every scorer is one pixel-wise function ``fn(z, temperature, **params) -> Tensor[B, H, W]`` over per-pixel class
scores ``z [B, C, H, W]`` (a pixel's score depends on that pixel's class scores only) plus its registration
(``@register_scorer(name, space=...)``). ``create_scorer`` wraps it in a :class:`Scorer` that turns any model output
into ``z`` (:func:`~oodseg.scoring.class_scores.pixel_class_scores`) and applies the temperature.

Channels: a model may declare OOD class channels (``outputs.ood_channels``, TDOS's ``ood`` class). Ordinary scorers
see only the in-distribution channels; a scorer registered with ``ood=True`` (``p_ood``) sees all of them and gets
``ood_channels``; it does not apply to models without such channels (``scorer_applies``).

Temperature placements (``T = temperature``):

* per-pixel logits (tensor / :class:`PixelLogits`): ``z = logits / T`` for both placements.
* :class:`MaskOutputs`, ``placement="cl"``: ``T`` divides the class logits before the per-query softmax,
  ``L = Σ_q softmax(class_logits_q / T)[:C] · sigmoid(mask_logits_q)``; the scorer then sees ``z = L`` (T_pl = 1).
* :class:`MaskOutputs`, ``placement="pl"``: ``L`` is built with ``T_cl = 1`` and the scorer sees ``z = L / T``.

The scorer function receives ``z`` and the temperature that divided it (``T_pl``: ``T`` or 1), which only ``energy``
uses (``−T_pl·logsumexp(z)``). Consequences worth knowing: for ``maxlogit``/``eim`` a pixel-level ``T`` is a positive
rescaling of the score (``−max_c L_c / T``), so it never changes a ranking metric; it only matters for mask outputs
with ``placement="cl"``. For ``rba`` the pixel-level ``T`` changes the saturation of ``tanh`` and so the ranking.
All computation is float32, whatever the input dtype.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from oodseg.outputs import MaskOutputs, PixelLogits, inlier_channels
from oodseg.registry import Registry
from oodseg.scoring.class_scores import Outputs, pixel_class_scores
from oodseg.scoring.context import ScoreContext, SharedStats, sharing, stats
from oodseg.scoring.spatial import gaussian_blur

PLACEMENTS = ("cl", "pl")

SCORERS: Registry[torch.Tensor] = Registry("scorer")

#: Default Tune space (OpenOOD-style postprocessor sweep): temperature log-uniform in [0.05, 20].
TEMPERATURE_SPACE: dict[str, dict[str, Any]] = {"temperature": {"type": "loguniform", "low": 0.05, "high": 20.0}}


def register_scorer(name: str | None = None, space: dict[str, dict[str, Any]] | None = None, ood: bool = False,
                    reads: str = "classes", fit: str | None = None, needs: Sequence[str] = (),
                    kinds: Sequence[str] = ("pixel", "mask"), blur: tuple[int, float] | None = None,
                    uses: Sequence[str] | None = None):
    """Decorator registering a scorer with its Tune search ``space`` and the facts the platform reads.

    Args:
        name: registry key; None: the function's ``__name__``.
        space: Tune space ``{param: {"type": ..., ...}}`` (as :data:`TEMPERATURE_SPACE`); None: that temperature space.
        ood: it reads the OOD class channels (``fn(z, temperature, ood_channels, **params)``).
        reads: ``"classes"``: a pixel-wise ``fn(z, temperature, **params) -> [B,H,W]``; ``"map"``:
            ``fn(ctx, temperature, **params)`` over a whole batch (:class:`ScoreContext`: class scores, features, the
            fit, the network).
        fit: the fit state it needs from the training split (``oodseg.scoring.posthoc.fit``), or None.
        needs: ``"features"`` (``model.predict(images, features=True)``) and/or ``"network"`` (the model and the
            input images at scoring time: the scorer runs the network itself).
        kinds: the model output kinds it applies to (``"pixel"``, ``"mask"``, ``"score"``).
        blur: a default ``(kernel, σ)`` Gaussian blur of the map; None: none.
        uses: every shared reduction of :class:`~oodseg.scoring.context.SharedStats` a pixel-wise scorer reads
            (``"z"``: it reads its input's values); None: unknown. Where all scorers of a block declare theirs,
            the reductions nobody reads again are overwritten in place (same bits, fewer passes to fresh memory).
    """
    if reads not in ("classes", "map"):
        raise ValueError(f"register_scorer: reads must be 'classes' or 'map', got {reads!r}")
    return SCORERS.register(name, space=dict(TEMPERATURE_SPACE if space is None else space), ood=ood, reads=reads,
                            fit=fit, needs=tuple(needs), kinds=tuple(kinds), blur=blur,
                            uses=None if uses is None else tuple(uses))


def scorer_applies(name: str, ood_channels: Sequence[int], kind: str | None = None, features: bool = True) -> bool:
    """Whether scorer ``name`` can score a model with these OOD channels (OOD scorers need at least one), of this
    output ``kind`` (None: any) and with (``features``) or without model features."""
    meta = SCORERS.meta(name)
    if kind is not None and kind not in meta["kinds"]:
        return False
    if not features and "features" in meta["needs"]:
        return False
    return bool(ood_channels) or not meta["ood"]


def default_scorers(kind: str | None = None) -> list[str]:
    """The scorers a benchmark runs when none are named: those that need no fit and do not run the network, for
    model outputs of ``kind`` (None: outputs with class scores, ``pixel`` or ``mask``; ``score``: saved maps)."""
    kinds = {kind} if kind else {"pixel", "mask"}
    return [n for n in SCORERS.list() if SCORERS.meta(n)["fit"] is None and "network" not in SCORERS.meta(n)["needs"]
            and kinds & set(SCORERS.meta(n)["kinds"])]


def list_scorers() -> list[str]:
    return SCORERS.list()


def scorer_space(name: str) -> dict[str, dict[str, Any]]:
    """The hyper-parameter space ``name`` declares: ``{param: {"type": "loguniform"|"choice", ...}}`` (a copy)."""
    return copy.deepcopy(SCORERS.meta(name)["space"])


# --------------------------------------------------------------------------------------------------------------
# Scorer functions: z = per-pixel class scores already divided by the pixel-level temperature
# --------------------------------------------------------------------------------------------------------------


@register_scorer("msp", uses=("rest",))
def msp(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Maximum softmax probability, ``s = 1 − max_c softmax(z)_c`` (Hendrycks & Gimpel, ICLR 2017; the
    ``1 − MSP`` form is the one SMIYC and the ERFNet anomaly-eval code report).

    With ``e_c = exp(z_c − max z)``, ``MSP = 1 / (1 + r)`` where ``r`` sums ``e_c`` over the non-maximal classes (plus
    one per extra tied maximum), so ``1 − MSP = r / (1 + r)``: confident pixels keep their full float32 resolution
    near 0 (``1 − p`` computed directly would round to multiples of 6e-8) and no ``argmax`` is needed."""
    rest = stats(z).rest()  # Σ e_c off the top class, shared with the other scorers of this block
    return rest / (1.0 + rest)


@register_scorer("maxlogit", uses=("max",))
def maxlogit(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Max logit, ``s = −max_c z_c`` (Hendrycks et al., "Scaling OOD detection to real-world settings", ICML 2022)."""
    return -stats(z).max().squeeze(1)


@register_scorer("eim", uses=("max",))
def eim(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Enhanced IsoMax+ score, ``s = −max_c z_c`` with ``z_c = −scaled distance to prototype c`` (Macêdo &
    Ludermir, "Enhanced Isotropy Maximization Loss", 2021): the max-logit function over an IsoMax+ head, kept as
    its own method so results name it."""
    return maxlogit(z, temperature)


@register_scorer("maxentropy", uses=("rest", "exp", "shifted", "sumexp"))
def maxentropy(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax entropy, ``s = −Σ_c p_c log p_c`` with ``p = softmax(z)`` (max-entropy / entropy baseline).

    From the block's shared reductions: with ``d = z − max z``, ``e = exp(d)`` and ``S = Σ e = 1 + rest``,
    ``log p_c = d_c − log S`` gives ``s = log1p(rest) − Σ_c e_c d_c / S`` (``log1p``: confident pixels keep the
    top class's share, which ``log S`` would round to 0)."""
    st = stats(z)
    return torch.log1p(st.rest()).sub_((st.exp() * st.shifted()).sum(dim=1).div_(st.sumexp()))


@register_scorer("energy", uses=("logsumexp",))
def energy(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Free energy, ``s = −T·logsumexp_c(L_c / T)`` (Liu et al., "Energy-based OOD detection", NeurIPS 2020);
    ``z = L / T`` so ``s = −T·logsumexp(z)``."""
    return -temperature * stats(z).logsumexp()


def rba_score(class_scores: torch.Tensor) -> torch.Tensor:
    """RbA anomaly score ``s = −Σ_c tanh(L_c)`` over dim 1 (Nayal et al., "RbA: Segmenting unknown regions rejected
    by all", ICCV 2023; github.com/NazirNayal8/RbA); the OE loss trains on the same function.

    Computed as ``C − 2·Σ_c σ(2·L_c)`` (``tanh x = 2σ(2x) − 1``): the same function and gradient within 2e-7 per
    class, and on the CPU ~4× faster than ``torch.tanh`` (whose vectorised kernel is 6× slower than ``sigmoid``)."""
    return class_scores.mul(2.0).sigmoid_().sum(dim=1).mul_(-2.0).add_(class_scores.shape[1])


@register_scorer("rba", uses=("z",))
def rba(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rejected by All, ``s = −Σ_c tanh(z_c)``; with ``placement="pl"`` this is ``−Σ_c tanh(L_c / T)``."""
    return rba_score(z)


@register_scorer("p_ood", ood=True, uses=("z",))
def p_ood(z: torch.Tensor, temperature: float, ood_channels: Sequence[int]) -> torch.Tensor:
    """Probability of the OOD class(es), ``s = Σ_{c ∈ ood} softmax(z)_c`` over all channels (TDOS's read-out:
    ``softmax`` of the 20 per-pixel class scores, channel ``ood``; Song & Lee, IROS 2025)."""
    return torch.softmax(z, dim=1)[:, list(ood_channels)].sum(dim=1)


@register_scorer("precomputed", reads="map", kinds=("score",), space={})
def precomputed(ctx: ScoreContext, temperature: float) -> torch.Tensor:
    """A ready-made anomaly score map as it is (:class:`~oodseg.outputs.ScoreMaps`, the ``precomputed`` model: another
    method's saved outputs); the temperature does not apply. Resized to the label size only if it differs (the model
    refuses maps of another size than their image, so on the benchmark this is the identity)."""
    return ctx.to_size(ctx.outputs.scores)


# --------------------------------------------------------------------------------------------------------------
# Scorer objects
# --------------------------------------------------------------------------------------------------------------


def _temperatures(outputs: Outputs, temperature: float, placement: str) -> tuple[float, float]:
    """``(T_cl, T_pl)`` for this output kind and placement."""
    if isinstance(outputs, MaskOutputs) and placement == "cl":
        return temperature, 1.0
    return 1.0, temperature


@dataclass(frozen=True)
class Scorer:
    """A registered scorer bound to a temperature and placement: ``scorer(outputs, size=None) -> [B, H, W]``.

    ``fit``: the fitted train-split state of a scorer registered with ``fit=`` (``ctx.fit``); ``blur``: ``(kernel,
    σ)`` Gaussian blur of the final map (:func:`~oodseg.scoring.spatial.gaussian_blur`; default: the registration's).
    """

    name: str
    temperature: float = 1.0
    placement: str = "cl"
    params: dict[str, Any] = field(default_factory=dict)
    fit: Any = field(default=None, compare=False, repr=False)
    blur: tuple[int, float] | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"scorer {self.name!r}: temperature must be > 0, got {self.temperature}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"scorer {self.name!r}: placement must be one of {PLACEMENTS}, got {self.placement!r}")
        fn = SCORERS.get(self.name)
        accepted = set(inspect.signature(fn).parameters) - {"z", "ctx", "temperature", "ood_channels"}
        unknown = set(self.params) - accepted
        if unknown:
            raise TypeError(
                f"scorer {self.name!r} got unknown parameters {sorted(unknown)}; accepts {sorted(accepted)}"
            )

    @property
    def reads_map(self) -> bool:
        return SCORERS.meta(self.name)["reads"] == "map"

    @property
    def blur_spec(self) -> tuple[int, float] | None:
        return self.blur if self.blur is not None else SCORERS.meta(self.name)["blur"]

    def from_context(self, ctx: ScoreContext, outputs: Outputs) -> torch.Tensor:
        """Apply a ``reads="map"`` scorer to a batch's shared :class:`ScoreContext` (its fit set for the call)."""
        ctx.fit = self.fit
        return SCORERS.get(self.name)(ctx, _temperatures(outputs, self.temperature, self.placement)[1],
                                      **self.params).float()

    def t_cl(self, outputs: Outputs) -> float:
        return _temperatures(outputs, self.temperature, self.placement)[0]

    def input_key(self, outputs: Outputs) -> tuple[bool, float]:
        """What its class scores are, as :meth:`from_class_scores` shares them: (reads the OOD channels, ``T_pl``)."""
        return bool(SCORERS.meta(self.name)["ood"]), _temperatures(outputs, self.temperature, self.placement)[1]

    def from_class_scores(self, scores: torch.Tensor, outputs: Outputs,
                          shared: dict[tuple[bool, float], SharedStats] | None = None,
                          uses: Collection[str] | None = None, owns_scores: bool = False) -> torch.Tensor:
        """Apply the scorer to ``pixel_class_scores(outputs, self.t_cl(outputs))`` (all channels; the scorer's
        channels are selected here). ``shared``: the :class:`SharedStats` of this block's scorer inputs, by
        :meth:`input_key`, filled on first use, so scorers with the same input share its reductions; ``uses``: every
        reduction the scorers that share them read (:func:`declared_uses`), None: unknown; ``owns_scores``:
        ``scores`` is the caller's own copy and no scorer of another input key reads it (it may be overwritten)."""
        ood = tuple(getattr(outputs, "ood_channels", ()))
        if not scorer_applies(self.name, ood):
            raise ValueError(f"scorer {self.name!r} needs a model with OOD class channels; these outputs have none")
        key = reads_ood, t_pl = self.input_key(outputs)
        shared = {} if shared is None else shared
        if key not in shared:
            z = scores[:, inlier_channels(outputs)] if ood and not reads_ood else scores
            own = owns_scores or z is not scores  # the channel selection is a copy
            if t_pl != 1.0:
                z, own = (z.div_(t_pl) if own else z / t_pl), True
            shared[key] = SharedStats(z, uses, owns_z=own)
        st = shared[key]
        with sharing(st):
            return SCORERS.get(self.name)(st.z, t_pl, **({"ood_channels": ood} if reads_ood else {}), **self.params)

    def __call__(
        self, outputs: Outputs, size: tuple[int, int] | None = None, chunk_pixels: int | None = None, *,
        model: Any = None, images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score one model batch, exactly like :func:`score_many` (same blocks, same bits).

        Args:
            outputs: the model's :class:`PixelLogits` / :class:`MaskOutputs` (raw logits, not probabilities; a bare
                ``[B,C,h,w]`` tensor counts as per-pixel logits), or ``ScoreMaps`` for the ``precomputed`` scorer.
            size: label ``(H, W)`` the map is made at; None: ``outputs.size``.
            model, images: the network and its uint8 input batch, for scorers that need ``"network"`` (ODIN, ReAct).

        Returns:
            ``[B, H, W]`` float32 anomaly scores, higher = more anomalous (void pixels are not masked here).
        """
        return score_many(outputs, [self], size, chunk_pixels, model=model, images=images)[0]


def create_scorer(name: str, temperature: float = 1.0, placement: str = "cl", *, fit: Any = None,
                  blur: Sequence[float] | None = None, **params: Any) -> Scorer:
    """Build scorer ``name`` (see :func:`list_scorers`) bound to its settings; call it on model outputs.

    Args:
        temperature: ``T > 0``; divides logits (per-pixel models) or, for mask outputs, the class logits before the
            per-query softmax (``placement="cl"``) or the combined class scores (``"pl"``).
        fit: the fitted train-split state of a scorer registered with ``fit=`` (``mahalanobis``, ``knn``,
            ``react``, ``sml``), else None.
        blur: ``(kernel, σ)`` Gaussian blur of the final map (S2M: ``(7, 1.0)``); None: the registration's default.
        params: the scorer function's own keyword parameters (its Tune space); unknown ones raise ``TypeError``.
    """
    spec = None if blur is None else (int(blur[0]), float(blur[1]))
    return Scorer(name, float(temperature), placement, dict(params), fit, spec)


#: Pixels per chunk when :func:`score_many` runs on the CPU: 16k pixels × 19 classes × 4 B ≈ 1.2 MB, so a scorer's
#: intermediates stay in L2 cache (several times faster than whole-batch ops: ``benchmarks/README.md``).
CPU_CHUNK_PIXELS = 1 << 14


def _raw_logits(outputs: Outputs, size: tuple[int, int] | None) -> torch.Tensor | None:
    """Per-pixel logits as they are (any float dtype) when :func:`pixel_class_scores` would only cast them."""
    if isinstance(outputs, torch.Tensor):
        logits, target = outputs, size
    elif isinstance(outputs, PixelLogits):
        logits, target = outputs.logits, size if size is not None else outputs.size
    else:
        return None
    if logits.ndim != 4 or not logits.is_floating_point():
        return None
    return logits if target is None or tuple(logits.shape[-2:]) == tuple(int(v) for v in target) else None


def score_many(
    outputs: Outputs, scorers: Sequence[Scorer], size: tuple[int, int] | None = None,
    chunk_pixels: int | None = None, *, model: Any = None, images: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Apply many scorers to one model output, computing each distinct ``pixel_class_scores`` only once.

    Scorers are grouped by the class-logit temperature they need (``T_cl``: their T for mask outputs with
    ``placement="cl"``, else 1), so a sweep of S scorers × K temperatures costs at most K+1 mask→pixel
    combinations instead of S·K. On the CPU the scorers then run over blocks of rows of one image at a time
    (``chunk_pixels``, default :data:`CPU_CHUNK_PIXELS`): scorers are pixel-wise, so the result is the same up to
    an ulp (vectorised vs scalar loop tails), and the blocks stay in cache; per-pixel logits that need no resize
    (e.g. fp16 cached outputs) are converted to float32 block by block. On an accelerator (``chunk_pixels=0``) each
    scorer sees the whole batch. Whole-map scorers (``reads="map"``) share one :class:`ScoreContext` (class scores
    once per ``T_cl``; ``model`` and the uint8 ``images`` for the scorers that run the network); a scorer's ``blur``
    is applied to its finished map. Returns one ``[B, H, W]`` float32 tensor per scorer, in order.

    Args:
        outputs: one model output: per-pixel logits ``[B, C, h, w]``, :class:`PixelLogits` or :class:`MaskOutputs`.
        scorers: bound scorers (:class:`Scorer`), each with its temperature, placement and params.
        size: label ``(H, W)`` the maps are resized to; None: ``outputs.size`` (None there: the output's own size).
    """
    results: list[torch.Tensor | None] = [None] * len(scorers)
    ctx = ScoreContext(outputs, size, model, images)
    for i, scorer in enumerate(scorers):
        if scorer.reads_map:
            results[i] = scorer.from_context(ctx, outputs)
    _pixelwise(outputs, scorers, size, chunk_pixels, results)
    for i, scorer in enumerate(scorers):
        if scorer.blur_spec is not None:
            results[i] = gaussian_blur(results[i], *scorer.blur_spec)
    return results  # type: ignore[return-value]


def declared_uses(scorers: Iterable[Scorer]) -> frozenset[str] | None:
    """Every shared reduction these pixel-wise scorers read (their registrations' ``uses``); None if one is
    undeclared."""
    declared = [SCORERS.meta(s.name)["uses"] for s in scorers]
    return None if any(u is None for u in declared) else frozenset().union(*declared)


def _pixelwise(outputs: Outputs, scorers: Sequence[Scorer], size: tuple[int, int] | None, chunk_pixels: int | None,
               results: list[torch.Tensor | None]) -> None:
    """The pixel-wise scorers of :func:`score_many`, grouped by ``T_cl``, whole or in row blocks (its docstring)."""
    groups: dict[float, list[int]] = {}
    for i, scorer in enumerate(scorers):
        if not scorer.reads_map:
            groups.setdefault(scorer.t_cl(outputs), []).append(i)
    for t_cl, members in groups.items():
        uses = declared_uses(scorers[i] for i in members)
        z = _raw_logits(outputs, size)
        if z is None:
            z = pixel_class_scores(outputs, t_cl, size)  # one group alive at a time
        if chunk_pixels is None:
            chunk_pixels = CPU_CHUNK_PIXELS if z.device.type == "cpu" else 0
        n, _, h, w = z.shape
        rows = max(1, chunk_pixels // w) if chunk_pixels else h
        one_input = len({scorers[i].input_key(outputs) for i in members}) == 1  # a copy of z may be overwritten
        if rows >= h:
            zf, shared = z.float(), {}
            for i in members:
                results[i] = scorers[i].from_class_scores(zf, outputs, shared, uses, one_input and zf is not z).float()
            continue
        for i in members:
            results[i] = torch.empty((n, h, w), dtype=torch.float32, device=z.device)
        for b in range(n):
            for r in range(0, h, rows):
                # float32 NCHW copy of the block (fp16 caches and channels-last model outputs alike; a view where z
                # is float32 NCHW already)
                block = z[b : b + 1, :, r : r + rows].to(torch.float32, memory_format=torch.contiguous_format)
                copy = one_input and block.untyped_storage().data_ptr() != z.untyped_storage().data_ptr()
                shared: dict[tuple[bool, float], SharedStats] = {}
                for i in members:
                    results[i][b, r : r + rows] = scorers[i].from_class_scores(block, outputs, shared, uses, copy)[0]
