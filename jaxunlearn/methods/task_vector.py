"""Task-vector negation (Ilharco et al. 2023, "Editing models with task arithmetic"; MUSE's "Task Vector").

Fine-tune the reference on the forget set (plain NLL), then subtract the task vector:
forget = ref - alpha * (finetuned - ref) = ref + alpha * (ref - finetuned), the same algebra as MOX's
extrapolation (written to RUN/forget/alpha_A). MUSE negates with alpha = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxunlearn.config import ConfigError
from jaxunlearn.methods.registry import Method, register


@dataclass(frozen=True)
class TaskVectorParams:
    alpha: float = 1.0  # scale of the negated task vector


def _check(p: TaskVectorParams, where: str) -> None:
    if not p.alpha > 0:
        raise ConfigError(f"{where}.alpha: must be > 0, got {p.alpha}")


register(Method(
    name="task_vector",
    params=TaskVectorParams,
    objective=lambda p: ("finetune", {}),
    data=lambda p: ("train",),
    result="extrapolated",
    loss="NLL(F) fine-tune, then ref − α(θ − ref)",
    source="Ilharco et al. 2023; MUSE (Shi et al. 2024) task vector",
    check=_check,
))
