"""Optimiser: AdamW with the paper's schedule, optional clipping and gradient accumulation.

Schedule (in optimiser steps): linear warm-up from 0 to `lr` over `warmup_steps`, then linear
decay to 0 at `total_steps` (step s uses lr * s / warmup_steps during warm-up, as HF does).
The paper warms up over the first epoch: warmup_steps = round(warmup_epochs * steps_per_epoch).

Weight decay applies to matrices and embeddings (ndim >= 2), not to biases or norm scales; the
model's stacked layer parameters (under "layers", one leading layer axis) are judged per layer.

Gradient accumulation uses optax.MultiSteps: each call of the train step consumes one
micro-batch; every `grad_accum`-th call applies the averaged update. The accumulated gradient
and micro-step counter live in the optimiser state, so a checkpoint taken at any micro-step
resumes exactly. The schedule counts optimiser (not micro) steps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How many steps a run takes, in optimiser and micro-batch steps."""

    micro_steps_per_epoch: int  # batches per epoch
    grad_accum: int
    epochs: int
    max_steps: int | None = None  # cap on optimiser steps

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (at least 1)."""
        return max(1, self.micro_steps_per_epoch // self.grad_accum)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run."""
        n = self.steps_per_epoch * self.epochs
        return n if self.max_steps is None else min(n, self.max_steps)

    def warmup_steps(self, warmup_epochs: float) -> int:
        """Optimiser steps of warm-up for a warm-up length in epochs (rounded up)."""
        return min(math.ceil(warmup_epochs * self.steps_per_epoch), self.total_steps)

    @property
    def total_micro_steps(self) -> int:
        """Train-step calls of the whole run (what the host loop iterates over)."""
        return self.total_steps * self.grad_accum


def linear_schedule(lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then lr -> 0 linearly at total_steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    decay = optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    warm = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warm, decay], [warmup_steps])


def decay_mask(params):
    """True for parameters that get weight decay: ndim >= 2, not counting the leading layer axis of the
    stacked parameters under a top-level "layers" key."""

    def decays(path, p):
        stacked = bool(path) and getattr(path[0], "key", None) == "layers"
        return p.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    lr: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = None,
    grad_accum: int = 1,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule): AdamW + linear warm-up/decay, optional clipping and accumulation."""
    schedule = linear_schedule(lr, total_steps, warmup_steps)
    parts = []
    if clip_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    opt = optax.chain(*parts)
    if grad_accum > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=grad_accum).gradient_transformation()
    return opt, schedule


def where_kept(keep, kept: jax.Array, other: jax.Array) -> jax.Array:
    """`kept` where `keep` holds, else `other`, for one parameter: keep is a bool, or a [num_layers] bool
    array selecting layer slices of a parameter stacked over layers (objectives.rmu.trainable_mask)."""
    import jax.numpy as jnp

    if isinstance(keep, bool):
        return kept if keep else other
    return jnp.where(jnp.asarray(keep).reshape((-1,) + (1,) * (kept.ndim - 1)), kept, other)


def keep_frozen(optimizer: optax.GradientTransformation, keep) -> optax.GradientTransformation:
    """`optimizer` with its updates zeroed where `keep` is False, so that frozen parameters do not move,
    not even by decoupled weight decay. keep: a pytree like the parameters of `where_kept` masks."""
    import jax.numpy as jnp

    def update_fn(updates, state, params=None):
        return jax.tree.map(lambda u, k: where_kept(k, u, jnp.zeros_like(u)), updates, keep), state

    return optax.chain(optimizer, optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn))


def optimizer_from_spec(
    train_spec, micro_steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule, StepPlan]:
    """(optimizer, schedule, plan) from a config.TrainSpec and the epoch length in batches."""
    plan = StepPlan(micro_steps_per_epoch, train_spec.grad_accum, train_spec.epochs, train_spec.max_steps)
    opt, schedule = make_optimizer(
        train_spec.lr,
        plan.total_steps,
        plan.warmup_steps(train_spec.warmup_epochs),
        weight_decay=train_spec.weight_decay,
        b1=train_spec.b1,
        b2=train_spec.b2,
        eps=train_spec.eps,
        clip_norm=train_spec.clip_norm,
        grad_accum=train_spec.grad_accum,
    )
    return opt, schedule, plan
