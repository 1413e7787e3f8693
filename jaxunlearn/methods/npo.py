"""Negative preference optimisation (Zhang et al. 2024; open-unlearning NPO.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.methods.registry import gradient_method


@dataclass(frozen=True)
class NPOParams:
    beta: float = 0.1
    gamma: float = 1.0  # forget weight
    alpha: float = 1.0  # retain weight
    retain_loss: str = "nll"  # nll | kl
    nll_reduction: str = "token"


gradient_method("npo", NPOParams, loss="−γ(2/β)·E_F log σ(−β log(p_θ/p_ref)) + α·NLL(R)",
                source="Zhang et al. 2024; open-unlearning NPO.yaml")
