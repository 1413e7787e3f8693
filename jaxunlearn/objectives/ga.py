"""Gradient ascent and its retain-regularised forms (open-unlearning GradAscent / GradDiff; TOFU's
grad_ascent, grad_diff and KL losses).

  ga        -NLL(forget)
  graddiff  gamma * -NLL(forget) + alpha * R,  R = NLL(retain) ("nll") or KL(p_ref || p_theta) ("kl")
  kl        graddiff with R = KL: TOFU's "KL" baseline (-NLL(forget) + KL on retain); open-unlearning
            runs it as GradDiff with retain_loss_type KL

Defaults as open-unlearning configs/trainer/{GradAscent,GradDiff}.yaml: gamma = alpha = 1,
retain NLL, NLL averaged over the batch's tokens (HF's `outputs.loss`). Retain-term conventions: terms.py.
"""

from __future__ import annotations

from jaxunlearn.objectives.registry import register
from jaxunlearn.objectives.terms import NLL_REDUCTIONS, RETAIN_LOSSES, check_choice, forget_nll, with_retain


@register("ga")
def ga(nll_reduction: str = "token"):
    """-NLL(forget). Source: open-unlearning src/trainer/unlearn/grad_ascent.py; TOFU grad_ascent."""
    check_choice("ga", "nll_reduction", nll_reduction, NLL_REDUCTIONS)

    def objective(params, ref_params, batch, apply):
        nll = forget_nll(params, batch, apply, "ga", nll_reduction)
        return -nll, {"forget_nll": nll}

    return objective


def _graddiff(name: str, gamma: float, alpha: float, retain_loss: str, nll_reduction: str):
    check_choice(name, "nll_reduction", nll_reduction, NLL_REDUCTIONS)
    check_choice(name, "retain_loss", retain_loss, RETAIN_LOSSES)

    def objective(params, ref_params, batch, apply):
        nll = forget_nll(params, batch, apply, name, nll_reduction)
        return with_retain(name, -nll, {"forget_nll": nll}, params, ref_params, batch, apply,
                           gamma=gamma, alpha=alpha, kind=retain_loss, reduction=nll_reduction)

    return objective


@register("graddiff")
def graddiff(gamma: float = 1.0, alpha: float = 1.0, retain_loss: str = "nll", nll_reduction: str = "token"):
    """gamma * -NLL(forget) + alpha * (NLL or KL on retain). Source: open-unlearning grad_diff.py."""
    return _graddiff("graddiff", gamma, alpha, retain_loss, nll_reduction)


@register("kl")
def kl(gamma: float = 1.0, alpha: float = 1.0, nll_reduction: str = "token"):
    """KL minimisation: gamma * -NLL(forget) + alpha * KL(p_ref || p_theta) on retain.
    Source: TOFU dataloader.py (forget_loss "KL"); open-unlearning GradDiff with retain_loss_type KL."""
    return _graddiff("kl", gamma, alpha, "kl", nll_reduction)
