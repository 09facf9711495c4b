"""``odin``: temperature scaling + input pre-processing (Liang, Li & Srikant, "Enhancing the Reliability of
Out-of-distribution Image Detection in Neural Networks", ICLR 2018; the facts as in OpenOOD's ``odin_postprocessor``).

For the network input ``x`` (``model.model_input``: what ``predict`` feeds the network), the predicted classes
``ŷ = argmax L(x)`` and the cross-entropy ``ℓ = CE(L(x) / T, ŷ)`` averaged over the pixels of the batch:
``x̃ = x − ε · sign(∇ₓ ℓ) / std`` with ``sign(g) = +1 for g ≥ 0, −1 otherwise`` (the reference's ``torch.ge``) and
``std`` the model's input std (``model.input_std()``; ε is in [0, 1] pixel units, as the reference divides by its
normalisation std). The anomaly score is ``1 − max_c softmax(L(x̃) / T)_c`` at the label size (the reference's
confidence is the max softmax). The temperature is the scorer's ``T`` (the paper uses T = 1000, ε ≈ 0.0014).

It runs the network twice more (a forward + backward for the gradient, one forward on ``x̃``), batched over the
batch the scoring actor already holds: per-pixel models only (``kinds=("pixel",)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oodseg.scoring.context import ScoreContext
from oodseg.scoring.scorers import msp, register_scorer

ODIN_SPACE = {"temperature": {"type": "loguniform", "low": 1.0, "high": 1000.0},
              "epsilon": {"type": "uniform", "low": 0.0, "high": 0.004}}


def perturb(model: torch.nn.Module, x: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
    """``x − ε · sign(∇ₓ CE(L(x)/T, argmax L(x))) / std``; ``x`` is not modified."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        logits = model(x).logits.float()
        loss = F.cross_entropy(logits / temperature, logits.detach().argmax(1))
        (grad,) = torch.autograd.grad(loss, x)
    step = torch.where(grad >= 0, 1.0, -1.0) / model.input_std().to(x.device).view(1, -1, 1, 1)
    return x.detach() - epsilon * step


@register_scorer("odin", space=ODIN_SPACE, reads="map", needs=("network",), kinds=("pixel",))
def odin(ctx: ScoreContext, temperature: float, epsilon: float = 0.0014) -> torch.Tensor:
    """``1 − MSP`` of the perturbed input at temperature ``T``."""
    model = ctx.network("odin")
    x, _ = model.model_input(ctx.images)
    x_tilde = perturb(model, x, temperature, float(epsilon))
    with torch.no_grad():
        z = ctx.logits_at_size(model(x_tilde).logits)
    return msp(z / temperature, temperature)
