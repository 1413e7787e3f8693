"""Unlearning objectives: pure loss functions with one signature and a registry.

    objective(params, ref_params, batch, apply) -> (loss, metrics)

See registry.py for the contract and how to add one; common.py for the NLL/KL conventions.
"""

# the modules register their objectives when imported
from jaxunlearn.objectives import dpo, finetune, ga, idk, mox, npo, rmu, undial  # noqa: F401
from jaxunlearn.objectives.registry import (
    OBJECTIVES,
    Objective,
    UnknownObjectiveError,
    get_objective,
    register,
)

__all__ = ["OBJECTIVES", "Objective", "UnknownObjectiveError", "get_objective", "register"]
