"""KL minimisation: gradient ascent on the forget set, KL to the reference on the retain set (TOFU's "KL")."""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.methods.registry import gradient_method


@dataclass(frozen=True)
class KLParams:
    gamma: float = 1.0  # forget weight
    alpha: float = 1.0  # retain (KL) weight
    nll_reduction: str = "token"


gradient_method("kl", KLParams, loss="−γ·NLL(F) + α·KL(ref‖θ; R)", source="Maini et al. 2024 (TOFU KL)")
