"""MOX: memorise the forget set, then extrapolate through the reference (../shared/design/mox.md).

Trains `objective` (mox: forget NLL + retain_weight * KL(ref || theta) on retain; mox_npo: negated
NPO + KL; mox_targeted: mox - target_weight * NLL(target answer)), then writes
forget = ref + alpha * (ref - memorised) for `alpha` (the result) and, with `jaxunlearn extrapolate`,
for the `alphas` sweep. `momentum` blends a running forget model every `momentum_every` optimiser
steps (0: once per epoch) and once more at the last step; the momentum model is then the result.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from jaxunlearn.config import ConfigError
from jaxunlearn.methods.registry import Method, register

OBJECTIVES = ("mox", "mox_npo", "mox_targeted")


@dataclass(frozen=True)
class MoxParams:
    objective: str = "mox"  # mox | mox_npo | mox_targeted
    retain_weight: float = 1.0
    beta: float = 0.1  # NPO temperature (mox_npo)
    target_weight: float = 1.0  # weight of the subtracted target NLL (mox_targeted)
    alpha: float = 4.0  # extrapolation coefficient of the result model
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # sweep written by `jaxunlearn extrapolate`
    rule: str = "linear"  # a key of jaxunlearn.extrapolate.RULES
    momentum: bool = False  # on-the-fly extrapolation with momentum during memorisation
    eta: float = 0.675
    momentum_every: int = 0  # optimiser steps between momentum updates; 0 = once per epoch


def _objective(p: MoxParams) -> tuple[str, dict]:
    from jaxunlearn.objectives import OBJECTIVES as REGISTERED

    takes = inspect.signature(REGISTERED[p.objective]).parameters
    return p.objective, {k: getattr(p, k) for k in ("retain_weight", "beta", "target_weight") if k in takes}


def _check(p: MoxParams, where: str) -> None:
    if p.objective not in OBJECTIVES:
        raise ConfigError(f"{where}.objective: expected one of {', '.join(OBJECTIVES)}, got {p.objective!r}")
    if not 0.0 <= p.eta <= 1.0:
        raise ConfigError(f"{where}.eta: must be in [0, 1], got {p.eta}")
    if p.momentum_every < 0:
        raise ConfigError(f"{where}.momentum_every: must be >= 0, got {p.momentum_every}")
    if not p.beta > 0:  # the NPO losses divide by beta
        raise ConfigError(f"{where}.beta: must be > 0, got {p.beta}")
    if not p.alpha > 0:
        raise ConfigError(f"{where}.alpha: must be > 0, got {p.alpha}")
    if not p.alphas or not all(a > 0 for a in p.alphas):
        raise ConfigError(f"{where}.alphas: must be a non-empty list of values > 0, got {list(p.alphas)}")


register(Method(
    name="mox",
    params=MoxParams,
    objective=_objective,
    data=lambda p: ("forget", "retain", "target") if p.objective == "mox_targeted" else ("forget", "retain"),
    result="extrapolated",
    loss="NLL(F) + w·KL(ref‖θ; R), then ref + α(ref − θ)",
    source="MOX (../shared/design/mox.md)",
    check=_check,
    stage_dir="memorized",
))
