"""Gradient difference: ascend on the forget set, descend on the retain set (open-unlearning GradDiff)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.methods.registry import gradient_method


@dataclass(frozen=True)
class GradDiffParams:
    gamma: float = 1.0  # forget weight
    alpha: float = 1.0  # retain weight
    retain_loss: str = "nll"  # nll | kl (KL(ref || theta) on retain)
    nll_reduction: str = "token"


gradient_method("graddiff", GradDiffParams, loss="−γ·NLL(F) + α·NLL(R) (or α·KL(ref‖θ; R))",
                source="Liu et al. 2022; open-unlearning GradDiff.yaml")
