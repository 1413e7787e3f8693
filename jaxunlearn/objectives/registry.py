"""The objective registry: name -> factory(**hparams) -> objective.

Every objective has one signature:

    objective(params, ref_params, batch, apply) -> (loss, metrics)

  params      trainable parameter pytree
  ref_params  frozen reference parameters (never differentiated; may be unused)
  batch       dict of batches, e.g. {"forget": b, "retain": b, "target": b} (see jaxunlearn.ops)
  apply       apply(params, input_ids, attention_mask) -> logits [B, T, V]
  loss        scalar to minimise by gradient descent
  metrics     dict[str, scalar]

Adding an objective: write a factory in its own module under jaxunlearn/objectives/, decorate it
with `@register("name")`, and import that module in jaxunlearn/objectives/__init__.py.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from jaxunlearn.errors import JaxunlearnError
from jaxunlearn.registry import Registry

Objective = Callable[..., tuple[Any, dict[str, Any]]]


class UnknownObjectiveError(JaxunlearnError, ValueError):
    """No objective of that name, or a hyper-parameter it does not take."""


OBJECTIVES = Registry("objective", UnknownObjectiveError)  # name -> factory(**hparams) -> Objective


def register(name: str):
    """Decorator adding a factory to OBJECTIVES under `name`."""
    return lambda factory: OBJECTIVES.add(name, factory)


def get_objective(name: str, **hparams) -> Objective:
    """Build a registered objective; unknown names or hyper-parameters raise one-line errors."""
    factory = OBJECTIVES.lookup(name)
    accepted = set(inspect.signature(factory).parameters)
    extra = sorted(set(hparams) - accepted)
    if extra:
        raise UnknownObjectiveError(f"objective {name!r} does not take {extra} (takes: {sorted(accepted)})")
    return factory(**hparams)
