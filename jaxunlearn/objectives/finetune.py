"""Plain fine-tuning (reference or retain model training).

The training split is batch["train"] when present, else batch["retain"] (so a paired iterator
whose retain side is the training split also works). Loss: NLL averaged over all scored tokens
of the batch (nll_reduction "token"), the usual causal-LM fine-tuning loss; "sample" averages
per-sample means.
"""

from __future__ import annotations

from jaxunlearn.objectives.common import MissingBatchKeyError, batch_nll
from jaxunlearn.objectives.registry import register
from jaxunlearn.objectives.terms import NLL_REDUCTIONS, check_choice


@register("finetune")
def finetune(nll_reduction: str = "token"):
    check_choice("finetune", "nll_reduction", nll_reduction, NLL_REDUCTIONS)

    def objective(params, ref_params, batch, apply):
        if "train" in batch:
            data = batch["train"]
        elif "retain" in batch:
            data = batch["retain"]
        else:
            raise MissingBatchKeyError(
                f"objective 'finetune' needs batch['train'] or batch['retain']; batch has keys {sorted(batch)}")
        nll = batch_nll(apply, params, data, nll_reduction)
        return nll, {"nll": nll}

    return objective
