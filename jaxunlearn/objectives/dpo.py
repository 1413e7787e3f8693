"""DPO / IdkDPO for unlearning (Rafailov et al. 2023; TOFU's "dpo" loss with "I don't know" answers
preferred over the forget answers).

  dpo  gamma * -(2/beta) * mean_i log sigmoid(beta * (r_w(i) - r_l(i))) + alpha * R
       r_w = log p_theta(y_idk|x) - log p_ref(y_idk|x)   (preferred: batch["target"], row i)
       r_l = log p_theta(y|x) - log p_ref(y|x)           (rejected: batch["forget"], row i)

batch["target"] row i must be forget prompt i with a target answer (data.target_rows builds it).
Sequence log-probs are summed over answer tokens; pairs where either side has no scored token are
left out. The 2/beta factor is open-unlearning's (utils.compute_dpo_loss); TOFU's original dpo loss
lacks it. Defaults as open-unlearning configs/trainer/DPO.yaml: beta 0.1, gamma 1, alpha 1, retain NLL.
"idkdpo" is the same objective (the name open-unlearning's experiment idk.yaml gives it).
"""

from __future__ import annotations

import jax

from jaxunlearn.objectives.common import log_ratio_to_ref, masked_mean, require
from jaxunlearn.objectives.registry import register
from jaxunlearn.objectives.terms import NLL_REDUCTIONS, RETAIN_LOSSES, check_choice, check_positive, with_retain


@register("idkdpo")
@register("dpo")
def dpo(beta: float = 0.1, gamma: float = 1.0, alpha: float = 1.0, retain_loss: str = "nll",
        nll_reduction: str = "token"):
    """DPO with the target answer preferred over the forget answer. Source: open-unlearning dpo.py."""
    check_positive("dpo", "beta", beta)
    check_choice("dpo", "retain_loss", retain_loss, RETAIN_LOSSES)
    check_choice("dpo", "nll_reduction", nll_reduction, NLL_REDUCTIONS)

    def objective(params, ref_params, batch, apply):
        lose = require(batch, "forget", "dpo")
        win = require(batch, "target", "dpo")
        win_ratio, win_valid = log_ratio_to_ref(params, ref_params, win, apply)
        lose_ratio, lose_valid = log_ratio_to_ref(params, ref_params, lose, apply)
        valid = win_valid & lose_valid
        margin = win_ratio - lose_ratio
        loss = -(2.0 / beta) * masked_mean(jax.nn.log_sigmoid(beta * margin), valid)
        metrics = {"forget_dpo": loss, "dpo_margin": masked_mean(margin, valid)}
        return with_retain("dpo", loss, metrics, params, ref_params, batch, apply,
                           gamma=gamma, alpha=alpha, kind=retain_loss, reduction=nll_reduction)

    return objective
