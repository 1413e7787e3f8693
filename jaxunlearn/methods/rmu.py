"""RMU: steer one layer's activations on the forget set to a fixed random direction, keep them on the
retain set (Li et al. 2024, WMDP; open-unlearning RMU.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.methods.registry import RETAIN_LOSSES, gradient_method


@dataclass(frozen=True)
class RMUParams:
    layer: int = 7  # decoder layer whose output is steered (0-indexed; open-unlearning model.layers.7)
    steering_coeff: float = 2.0
    gamma: float = 1.0  # forget weight
    alpha: float = 1.0  # retain weight
    retain_loss: str = "embed_diff"  # embed_diff | nll | kl
    trainable: str = ".*"  # regex of parameter paths that receive gradients
    seed: int = 0  # the random steering direction
    nll_reduction: str = "token"


gradient_method("rmu", RMUParams, loss="γ·‖h_ℓ(F) − c·u‖² + α·‖h_ℓ(R) − h_ℓ^ref(R)‖²",
                source="Li et al. 2024 (WMDP); open-unlearning RMU.yaml", retain_losses=("embed_diff",) + RETAIN_LOSSES)
