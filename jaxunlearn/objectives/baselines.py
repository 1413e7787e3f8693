"""Gradient-ascent-family unlearning baselines (minimised by gradient descent, like every objective).

  ga        -NLL(forget)
  graddiff  -NLL(forget) + retain_weight * NLL(retain)
  npo       -(2/beta) * mean_F log sigmoid(-beta * (logp_theta(y|x) - logp_ref(y|x))) + retain_weight * NLL(retain)
  simnpo    -(2/beta) * mean_F log sigmoid(beta * (NLL_len(y|x) - delta)) + retain_weight * NLL(retain)
            (reference-free; NLL_len is the length-normalised NLL of the sample)

NLL and log-prob conventions are those of objectives/common.py (per-sample length-normalised
NLL averaged over samples; NPO uses summed answer log-probs). retain_weight=0 drops the retain term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxunlearn.objectives.common import batch_nll, log_ratio_to_ref, masked_mean, require, sequence_sums, token_logps
from jaxunlearn.objectives.registry import register


def _forget_nll(params, batch, apply, name):
    forget = require(batch, "forget", name)
    return batch_nll(apply, params, forget)


def _retain_term(params, batch, apply, name, retain_weight):
    """(retain_weight * NLL(retain), NLL(retain)); zeros without evaluating when retain_weight == 0."""
    if retain_weight == 0:
        zero = jnp.zeros((), jnp.float32)
        return zero, zero
    retain = require(batch, "retain", name)
    nll = batch_nll(apply, params, retain)
    return retain_weight * nll, nll


@register("ga")
def ga():
    def objective(params, ref_params, batch, apply):
        nll = _forget_nll(params, batch, apply, "ga")
        return -nll, {"forget_nll": nll}

    return objective


@register("graddiff")
def graddiff(retain_weight: float = 1.0):
    def objective(params, ref_params, batch, apply):
        nll = _forget_nll(params, batch, apply, "graddiff")
        weighted, retain_nll = _retain_term(params, batch, apply, "graddiff", retain_weight)
        return -nll + weighted, {"forget_nll": nll, "retain_nll": retain_nll}

    return objective


@register("npo")
def npo(beta: float = 0.1, retain_weight: float = 1.0):
    def objective(params, ref_params, batch, apply):
        forget = require(batch, "forget", "npo")
        log_ratio, valid = log_ratio_to_ref(params, ref_params, forget, apply)
        npo_loss = -(2.0 / beta) * masked_mean(jax.nn.log_sigmoid(-beta * log_ratio), valid)
        weighted, retain_nll = _retain_term(params, batch, apply, "npo", retain_weight)
        return npo_loss + weighted, {"forget_npo": npo_loss, "forget_log_ratio": masked_mean(log_ratio, valid),
                                     "retain_nll": retain_nll}

    return objective


@register("simnpo")
def simnpo(beta: float = 4.5, delta: float = 0.0, retain_weight: float = 1.0):
    def objective(params, ref_params, batch, apply):
        forget = require(batch, "forget", "simnpo")
        total, count = sequence_sums(*token_logps(apply, params, forget))
        per_sample, valid = -total / jnp.maximum(count, 1.0), count > 0
        simnpo_loss = -(2.0 / beta) * masked_mean(jax.nn.log_sigmoid(beta * (per_sample - delta)), valid)
        weighted, retain_nll = _retain_term(params, batch, apply, "simnpo", retain_weight)
        return simnpo_loss + weighted, {"forget_simnpo": simnpo_loss, "forget_nll": masked_mean(per_sample, valid),
                                        "retain_nll": retain_nll}

    return objective
