"""The method registry: name -> Method.

A method is what a user selects with `method=NAME` (and tunes with `method.KEY=VALUE`): one small
module under jaxunlearn/methods/ holding

  params     a frozen dataclass of its hyper-parameters, defaults as published (see `source`)
  objective  params -> (objective name, objective kwargs): the loss it trains, a registered
             jaxunlearn.objectives entry
  data       params -> the batches the objective reads, a subset of ("forget", "retain", "target");
             "train" means the forget batch fed as plain fine-tuning data (task vector)
  result     what follows training: "trained" (the trained model is the result: gradient methods)
             or "extrapolated" (forget = ref + alpha * (ref - trained), written to RUN/forget/:
             MOX and task-vector negation)
  loss, source  a one-line formula and the paper / code it follows (README's methods table)

Adding a method: write jaxunlearn/methods/NAME.py calling `register(Method(...))` and import it
in jaxunlearn/methods/__init__.py. This module imports no JAX, so config validation stays cheap.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxunlearn.errors import JaxunlearnError
from jaxunlearn.registry import Registry

BATCHES = ("forget", "retain", "target", "train")
RESULTS = ("trained", "extrapolated")


class UnknownMethodError(JaxunlearnError, ValueError):
    """No method of that name."""


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    params: type
    objective: Callable[[Any], tuple[str, dict]]
    data: Callable[[Any], tuple[str, ...]]
    result: str
    loss: str
    source: str
    check: Callable[[Any, str], None] = lambda params, where: None  # (params, "method") -> raise ConfigError
    stage_dir: str = "trained"  # checkpoint folder of the training stage inside the run

    def __post_init__(self):
        if self.result not in RESULTS:
            raise ValueError(f"method {self.name!r}: result must be one of {RESULTS}, got {self.result!r}")


METHODS = Registry("method", UnknownMethodError)


def register(method: Method) -> Method:
    return METHODS.add(method.name, method)


def get_method(name: str) -> Method:
    return METHODS.lookup(name)


def all_fields(params) -> dict:
    """The hyper-parameters as objective kwargs (every field, by name)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


NLL_REDUCTIONS = ("token", "sample")
RETAIN_LOSSES = ("nll", "kl")


def check_common(params, where: str, retain_losses: tuple[str, ...] = RETAIN_LOSSES) -> None:
    """Checks shared by the gradient methods: the choice fields and positive temperatures, weights >= 0."""
    from jaxunlearn.config import ConfigError

    values = all_fields(params)
    choices = {"nll_reduction": NLL_REDUCTIONS, "retain_loss": retain_losses}
    for key, allowed in choices.items():
        if key in values and values[key] not in allowed:
            raise ConfigError(f"{where}.{key}: expected one of {', '.join(allowed)}, got {values[key]!r}")
    for key in ("beta",):
        if key in values and not values[key] > 0:
            raise ConfigError(f"{where}.{key}: must be > 0, got {values[key]}")
    for key in ("gamma", "alpha"):
        if key in values and values[key] < 0:
            raise ConfigError(f"{where}.{key}: must be >= 0, got {values[key]}")


def gradient_method(name: str, params: type, loss: str, source: str, data: tuple[str, ...] = ("forget", "retain"),
                    retain_losses: tuple[str, ...] = RETAIN_LOSSES) -> Method:
    """Register a method that trains objective `name` with every field of `params` and keeps the trained model."""
    return register(Method(
        name=name,
        params=params,
        objective=lambda p: (name, all_fields(p)),
        data=lambda p: data,
        result="trained",
        loss=loss,
        source=source,
        check=lambda p, where: check_common(p, where, retain_losses),
    ))
