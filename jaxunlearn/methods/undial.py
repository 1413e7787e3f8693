"""UNDIAL: self-distillation towards the reference's logits with the forget token's logit lowered by
beta (Dong et al. 2024; open-unlearning UNDIAL.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.methods.registry import gradient_method


@dataclass(frozen=True)
class UNDIALParams:
    beta: float = 10.0  # logit reduction of the forget token
    gamma: float = 1.0  # forget weight
    alpha: float = 0.0  # retain weight (open-unlearning: 0)
    retain_loss: str = "nll"  # nll | kl
    nll_reduction: str = "token"


gradient_method("undial", UNDIALParams, loss="γ·CE(softmax(z_ref − β·1[y]), p_θ; F) + α·NLL(R)",
                source="Dong et al. 2024; open-unlearning UNDIAL.yaml")
