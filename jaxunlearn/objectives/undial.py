"""UNDIAL: self-distillation toward the reference's logits with the forget token's logit lowered
(Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning").

  undial  gamma * mean_t CE(p_theta(.|x_<t), softmax(z_ref(.|x_<t) - beta * onehot(y_t))) + alpha * R

z_ref are the frozen reference's logits. The mean runs over every position whose next token is real
(prompt and answer); the logit of the next token is lowered only where that token is scored (an
answer token), elsewhere the target is the reference's distribution itself.
Source: open-unlearning src/trainer/utils.py compute_undial_loss. Two differences, both at
positions whose label is -100: open-unlearning averages over all B*(T-1) positions (padding
included), and indexes the one-hot with the label -100, which lowers the logit of vocabulary id
V-100 there; on a batch without padding and with answer-only labels the values agree except for that
quirk. Defaults as open-unlearning configs/trainer/UNDIAL.yaml: beta 10, gamma 1, alpha 0 (no retain term).
"""

from __future__ import annotations

import jax

from jaxunlearn.objectives.common import masked_mean, next_real_mask, per_token, require
from jaxunlearn.objectives.registry import register
from jaxunlearn.objectives.terms import NLL_REDUCTIONS, RETAIN_LOSSES, check_choice, with_retain


def adjusted_distillation(beta: float):
    """TokenFn: cross-entropy of the model against softmax(ref logits - beta * onehot(scored target))."""

    def fn(logits, ref_logits, targets, mask):
        lowered = beta * mask[..., None] * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
        teacher = jax.nn.softmax(ref_logits - lowered, axis=-1)
        return -(teacher * jax.nn.log_softmax(logits, axis=-1)).sum(-1)

    return fn


@register("undial")
def undial(beta: float = 10.0, gamma: float = 1.0, alpha: float = 0.0, retain_loss: str = "nll",
           nll_reduction: str = "token"):
    """Adjusted-logit self-distillation on the forget batch (+ optional retain term)."""
    check_choice("undial", "retain_loss", retain_loss, RETAIN_LOSSES)
    check_choice("undial", "nll_reduction", nll_reduction, NLL_REDUCTIONS)
    token_fn = adjusted_distillation(beta)

    def objective(params, ref_params, batch, apply):
        forget = require(batch, "forget", "undial")
        values = per_token(apply, params, forget, token_fn, ref_params=ref_params)
        loss = masked_mean(values, next_real_mask(forget))
        return with_retain("undial", loss, {"forget_undial": loss}, params, ref_params, batch, apply,
                           gamma=gamma, alpha=alpha, kind=retain_loss, reduction=nll_reduction)

    return objective
