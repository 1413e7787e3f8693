"""Terms shared by the baselines: the forget NLL, the retain loss and their weighted sum.

open-unlearning writes every baseline as

    loss = gamma * forget_loss + alpha * retain_loss

with `retain_loss` the retain NLL ("nll", its default) or KL(p_ref || p_theta) on the retain
batch ("kl"); the baselines here take the same `gamma`, `alpha` and `retain_loss` hyper-parameters.
alpha == 0 skips the retain batch entirely (nothing is evaluated).

Retain KL positions: ours are those of common.retain_kl (every position whose next token is real,
averaged over the batch). open-unlearning's `compute_kl_divergence` applies `kl_div(...,
reduction="batchmean")` to the flattened [B*T, V] log-probs: it averages over all B*T positions,
padding and each row's final position included, so its value depends on the padding length.
"""

from __future__ import annotations

from jaxunlearn.objectives.common import batch_nll, require, retain_kl

NLL_REDUCTIONS = ("token", "sample")
RETAIN_LOSSES = ("nll", "kl")


def check_choice(objective: str, key: str, value, choices) -> None:
    """One-line ValueError when a hyper-parameter is not one of `choices` (raised at build time)."""
    if value not in choices:
        raise ValueError(f"objective {objective!r}: {key} must be one of {list(choices)}, got {value!r}")


def check_positive(objective: str, key: str, value) -> None:
    """One-line ValueError unless value > 0 (raised at build time)."""
    if not value > 0:
        raise ValueError(f"objective {objective!r}: {key} must be > 0, got {value!r}")


def forget_nll(params, batch, apply, name: str, reduction: str):
    """NLL of the forget batch's answers."""
    return batch_nll(apply, params, require(batch, "forget", name), reduction)


def retain_term(params, ref_params, batch, apply, name: str, kind: str, reduction: str):
    """(retain loss, {"retain_nll" or "retain_kl": value}) of batch["retain"] (kind "nll" or "kl")."""
    retain = require(batch, "retain", name)
    if kind == "nll":
        value = batch_nll(apply, params, retain, reduction)
        return value, {"retain_nll": value}
    value = retain_kl(apply, params, ref_params, retain)
    return value, {"retain_kl": value}


def with_retain(name: str, forget_loss, forget_metrics: dict, params, ref_params, batch, apply, *,
                gamma: float, alpha: float, kind: str, reduction: str):
    """(gamma * forget_loss + alpha * retain loss, metrics); alpha == 0 leaves the retain batch unused."""
    metrics = dict(forget_metrics)
    loss = gamma * forget_loss
    if alpha != 0:
        retain, retain_metrics = retain_term(params, ref_params, batch, apply, name, kind, reduction)
        loss = loss + alpha * retain
        metrics.update(retain_metrics)
    return loss, metrics
