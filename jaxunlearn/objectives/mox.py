"""MOX memorisation objectives (minimised by gradient descent; see design/mox.md).

  mox           NLL(forget) + retain_weight * KL(p_ref || p_theta) on retain data
  mox_npo       (2/beta) * mean_F log sigmoid(-beta * (logp_theta(y|x) - logp_ref(y|x)))  (negated NPO)
                + retain_weight * KL; unbounded below, so train it for a fixed budget
  mox_targeted  mox - target_weight * NLL(target answer | forget prompt); batch["target"] holds
                forget prompts paired with the target reply (e.g. "I don't know")

NLL reduction: MOX's default is nll_reduction="sample" (mean over forget samples of each sample's
length-normalised NLL), not the token mean of open-unlearning's baselines: memorisation should
raise every forget sample's likelihood alike, so a long answer must not outweigh a short one, and
the same per-sample quantity is what TOFU's forget probability measures. "token" is available.
Conventions for NLL and KL are in objectives/common.py.
"""

from __future__ import annotations

import jax

from jaxunlearn.objectives import common
from jaxunlearn.objectives.common import batch_nll, joint_hidden, log_ratio_to_ref, masked_mean, require
from jaxunlearn.objectives.registry import register
from jaxunlearn.objectives.terms import NLL_REDUCTIONS, check_choice, check_positive


def retain_kl(params, ref_params, batch, apply, name: str, hidden=None) -> jax.Array:
    """KL(p_ref || p_theta) over the retain batch (`hidden`: its hidden states, already computed)."""
    return common.retain_kl(apply, params, ref_params, require(batch, "retain", name), hidden)


@register("mox")
def mox(retain_weight: float = 1.0, nll_reduction: str = "sample"):
    """Forget NLL + retain_weight * retain KL."""
    check_choice("mox", "nll_reduction", nll_reduction, NLL_REDUCTIONS)

    def objective(params, ref_params, batch, apply):
        forget = require(batch, "forget", "mox")
        # forget and retain through the layers in one pass: one backward scan, one gradient
        h_forget, h_retain = joint_hidden(apply, params, [forget, require(batch, "retain", "mox")]) or (None, None)
        nll = batch_nll(apply, params, forget, nll_reduction, h_forget)
        kl = retain_kl(params, ref_params, batch, apply, "mox", h_retain)
        loss = nll + retain_weight * kl
        return loss, {"forget_nll": nll, "retain_kl": kl}

    return objective


@register("mox_npo")
def mox_npo(retain_weight: float = 1.0, beta: float = 0.1):
    """Negated NPO loss on the forget set + retain_weight * retain KL (no NLL: nothing to reduce)."""
    check_positive("mox_npo", "beta", beta)

    def objective(params, ref_params, batch, apply):
        forget = require(batch, "forget", "mox_npo")
        h_forget, h_retain = joint_hidden(apply, params, [forget, require(batch, "retain", "mox_npo")]) or (None, None)
        log_ratio, valid = log_ratio_to_ref(params, ref_params, forget, apply, h_forget)
        npo_mem = (2.0 / beta) * masked_mean(jax.nn.log_sigmoid(-beta * log_ratio), valid)
        kl = retain_kl(params, ref_params, batch, apply, "mox_npo", h_retain)
        loss = npo_mem + retain_weight * kl
        return loss, {"forget_npo": npo_mem, "forget_log_ratio": masked_mean(log_ratio, valid), "retain_kl": kl}

    return objective


@register("mox_targeted")
def mox_targeted(retain_weight: float = 1.0, target_weight: float = 1.0, nll_reduction: str = "sample"):
    """MOX loss minus target_weight * NLL of the target answers."""
    check_choice("mox_targeted", "nll_reduction", nll_reduction, NLL_REDUCTIONS)

    def objective(params, ref_params, batch, apply):
        forget = require(batch, "forget", "mox_targeted")
        target = require(batch, "target", "mox_targeted")
        retain = require(batch, "retain", "mox_targeted")
        h_forget, h_target, h_retain = joint_hidden(apply, params, [forget, target, retain]) or (None, None, None)
        nll = batch_nll(apply, params, forget, nll_reduction, h_forget)
        target_nll = batch_nll(apply, params, target, nll_reduction, h_target)
        kl = retain_kl(params, ref_params, batch, apply, "mox_targeted", h_retain)
        loss = nll - target_weight * target_nll + retain_weight * kl
        return loss, {"forget_nll": nll, "target_nll": target_nll, "retain_kl": kl}

    return objective
