"""IdkDPO / DPO: prefer the "I don't know" answer over the forget answer (Rafailov et al. 2023 as used by
TOFU; open-unlearning DPO.yaml). `idkdpo` and `dpo` are the same method (two names, as in open-unlearning)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.methods.registry import gradient_method


@dataclass(frozen=True)
class DPOParams:
    beta: float = 0.1
    gamma: float = 1.0  # preference-loss weight
    alpha: float = 1.0  # retain weight
    retain_loss: str = "nll"  # nll | kl
    nll_reduction: str = "token"


LOSS = "−γ(2/β)·E log σ(β(r_idk − r_F)) + α·NLL(R), r = log(p_θ/p_ref)"
SOURCE = "Rafailov et al. 2023; Maini et al. 2024; open-unlearning DPO.yaml"
for _name in ("idkdpo", "dpo"):
    gradient_method(_name, DPOParams, loss=LOSS, source=SOURCE, data=("forget", "target", "retain"))
