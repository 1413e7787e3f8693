"""IdkNLL: fine-tune toward "I don't know" answers on the forget prompts while keeping the retain
answers (TOFU's "idk" loss, Maini et al. 2024).

  idknll  NLL of the union of batch["target"] (forget prompts with target answers) and
          batch["retain"]: TOFU concatenates the two batches and takes HF's `outputs.loss`, i.e.
          with nll_reduction "token" (default) the token NLLs of both batches summed over the
          number of their scored tokens; with "sample", the mean over all samples of both
          batches of the per-sample mean NLL.

Source: locuslab/tofu dataloader.py (forget_loss "idk"). It has no weights: a target token and a
retain token weigh the same.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxunlearn.objectives.common import nll_from_sums, require, sequence_sums, token_logps
from jaxunlearn.objectives.registry import register
from jaxunlearn.objectives.terms import NLL_REDUCTIONS, check_choice


@register("idknll")
def idknll(nll_reduction: str = "token"):
    """NLL over the target and retain batches taken together."""
    check_choice("idknll", "nll_reduction", nll_reduction, NLL_REDUCTIONS)

    def objective(params, ref_params, batch, apply):
        target = sequence_sums(*token_logps(apply, params, require(batch, "target", "idknll")))
        retain = sequence_sums(*token_logps(apply, params, require(batch, "retain", "idknll")))
        loss = nll_from_sums(jnp.concatenate([target[0], retain[0]]), jnp.concatenate([target[1], retain[1]]),
                             nll_reduction)
        return loss, {"target_nll": nll_from_sums(*target, nll_reduction),
                      "retain_nll": nll_from_sums(*retain, nll_reduction)}

    return objective
