"""Negative preference optimisation: NPO (Zhang et al. 2024) and the reference-free SimNPO
(Fan et al. 2024), each with open-unlearning's retain term (terms.py).

  npo     gamma * -(2/beta) * mean_i log sigmoid(-beta * (log p_theta(y_i|x_i) - log p_ref(y_i|x_i)))
          + alpha * R
  simnpo  gamma * -(2/beta) * mean_i log sigmoid(beta * (NLL(y_i|x_i) / |y_i| - delta)) + alpha * R

log p(y|x) is the summed log-prob of the answer tokens (common.sequence_logprob); SimNPO's
NLL / |y| is the per-sample length-normalised NLL, whatever `nll_reduction` (which only sets the
retain NLL's reduction). Samples without a scored token are left out of the means. |y| counts
the scored next-token targets (labels[:, 1:]); open-unlearning counts labels[:, :] != -100, the
same whenever the first position is a prompt token.
Defaults as open-unlearning configs/trainer/NPO.yaml (beta 0.1, gamma 1, alpha 1) and
SimNPO.yaml (beta 4.5, delta 0, gamma 0.125, alpha 1; from the SimNPO authors' TOFU config).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxunlearn.objectives.common import log_ratio_to_ref, masked_mean, require, sequence_sums, token_logps
from jaxunlearn.objectives.registry import register
from jaxunlearn.objectives.terms import NLL_REDUCTIONS, RETAIN_LOSSES, check_choice, check_positive, with_retain


def _check(name, beta, retain_loss, nll_reduction):
    check_positive(name, "beta", beta)
    check_choice(name, "retain_loss", retain_loss, RETAIN_LOSSES)
    check_choice(name, "nll_reduction", nll_reduction, NLL_REDUCTIONS)


@register("npo")
def npo(beta: float = 0.1, gamma: float = 1.0, alpha: float = 1.0, retain_loss: str = "nll",
        nll_reduction: str = "token"):
    """NPO on the forget answers against the frozen reference. Source: open-unlearning npo.py and
    utils.compute_dpo_loss (win side empty)."""
    _check("npo", beta, retain_loss, nll_reduction)

    def objective(params, ref_params, batch, apply):
        forget = require(batch, "forget", "npo")
        log_ratio, valid = log_ratio_to_ref(params, ref_params, forget, apply)
        loss = -(2.0 / beta) * masked_mean(jax.nn.log_sigmoid(-beta * log_ratio), valid)
        metrics = {"forget_npo": loss, "forget_log_ratio": masked_mean(log_ratio, valid)}
        return with_retain("npo", loss, metrics, params, ref_params, batch, apply,
                           gamma=gamma, alpha=alpha, kind=retain_loss, reduction=nll_reduction)

    return objective


@register("simnpo")
def simnpo(beta: float = 4.5, delta: float = 0.0, gamma: float = 0.125, alpha: float = 1.0,
           retain_loss: str = "nll", nll_reduction: str = "token"):
    """SimNPO: NPO with the length-normalised NLL in place of the log-ratio to a reference, shifted
    by the margin delta. Source: open-unlearning simnpo.py (delta, beta, gamma as there)."""
    _check("simnpo", beta, retain_loss, nll_reduction)

    def objective(params, ref_params, batch, apply):
        forget = require(batch, "forget", "simnpo")
        total, count = sequence_sums(*token_logps(apply, params, forget))
        per_sample, valid = -total / jnp.maximum(count, 1.0), count > 0
        loss = -(2.0 / beta) * masked_mean(jax.nn.log_sigmoid(beta * (per_sample - delta)), valid)
        metrics = {"forget_simnpo": loss, "forget_nll": masked_mean(per_sample, valid)}
        return with_retain("simnpo", loss, metrics, params, ref_params, batch, apply,
                           gamma=gamma, alpha=alpha, kind=retain_loss, reduction=nll_reduction)

    return objective
