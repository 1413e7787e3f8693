"""SimNPO: reference-free NPO on the length-normalised NLL with margin delta (Fan et al. 2024;
open-unlearning SimNPO.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.methods.registry import gradient_method


@dataclass(frozen=True)
class SimNPOParams:
    beta: float = 4.5
    delta: float = 0.0
    gamma: float = 0.125  # forget weight
    alpha: float = 1.0  # retain weight
    retain_loss: str = "nll"  # nll | kl
    nll_reduction: str = "token"


gradient_method("simnpo", SimNPOParams, loss="−γ(2/β)·E_F log σ(β(NLL_len(y|x) − δ)) + α·NLL(R)",
                source="Fan et al. 2024; open-unlearning SimNPO.yaml")
