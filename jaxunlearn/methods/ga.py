"""Gradient ascent on the forget set (TOFU's "grad_ascent"; open-unlearning GradAscent)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.methods.registry import gradient_method


@dataclass(frozen=True)
class GAParams:
    nll_reduction: str = "token"  # token | sample (open-unlearning: token)


gradient_method("ga", GAParams, loss="−NLL(F)", source="Maini et al. 2024 (TOFU); open-unlearning GradAscent",
                data=("forget",))
