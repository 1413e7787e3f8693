"""The jitted train step and the host loop that drives it.

make_train_step(objective, apply, optimizer, mesh, param_shardings, ...) returns

    step(params, opt_state, batch, ref_params) -> (params, opt_state, metrics)

a pure function compiled with jax.jit and explicit in/out shardings: params and opt_state are
donated, ref_params never is (it may be the same sharding as params but is a separate buffer).
Batches are sharded over ("data", "fsdp"); metrics come back replicated.

Metrics always include: loss, grad_norm (before clipping), finite (bool), lr (the learning
rate this step used, when make_train_step is given the schedule) plus the objective's own metrics.

Non-finite guard: when the loss or the gradient norm is not finite, the step returns the
incoming params and opt_state unchanged (the update runs under jax.lax.cond, so nothing is corrupted)
and finite=False. The host loop then raises NonFiniteError naming the step; the error carries
the last good TrainState, and no checkpoint callback runs for the bad step.

Compute precision: params stay in their storage dtype (float32 by default); a bfloat16
compute model (init_model/load_hf with dtype="bfloat16") casts inside the forward pass, and
the losses are computed in float32 (jaxunlearn.ops).

train_loop(step_fn, state, ref_params, batches_from, n_steps, on_step) runs micro-steps
state.step .. n_steps-1. `batches_from(k)` must return an iterator starting at micro-step k,
so resuming from a restored state at step k replays exactly the batches an uninterrupted
run would have seen; all state that changes across steps is in TrainState.

Preemption: while train_loop runs (in the main thread), SIGTERM and SIGINT only set a flag; the
step in flight finishes, on_step runs for it (so the caller's logging and checkpoint schedule see
it), and the loop raises `Interrupted` carrying that state. The caller writes a checkpoint of
`err.state` and exits with `err.exit_code` (143 for SIGTERM, 130 for SIGINT) after printing
`err` ("interrupted at step N; rerun the same command to resume"). A second signal of either
kind stops at once (Interrupted without a state). `interruptible()` makes SIGTERM behave like
Ctrl-C (an `Interrupted` exception) around code outside the loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxunlearn.errors import JaxunlearnError
from jaxunlearn.interrupt import Interrupted, StopFlag, deferred_signals
from jaxunlearn.models.decoder import training_trace
from jaxunlearn.sharding import batch_sharding, replicated


class NonFiniteError(JaxunlearnError, FloatingPointError):
    """A step produced a non-finite loss or gradient; `.state` is the last good TrainState."""

    def __init__(self, message: str, state: "TrainState | None" = None, metrics: dict | None = None):
        super().__init__(message)
        self.state = state
        self.metrics = metrics


@dataclasses.dataclass
class TrainState:
    """Everything that changes across steps (what a checkpoint must hold for exact resume).

    step       number of train-step calls (micro-steps) done so far
    params     trainable parameters
    opt_state  optimiser state (includes accumulated gradients with grad_accum > 1)
    extras     other pytrees the caller evolves in on_step (e.g. the momentum forget model, an RNG key)
    """

    step: int
    params: Any
    opt_state: Any
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


def opt_state_shardings(optimizer: optax.GradientTransformation, params, param_shardings, mesh: Mesh):
    """Shardings for optimizer.init(params): parameter-shaped leaves follow the parameters,
    everything else (counters, scalars) is replicated."""
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def init_opt_state(optimizer: optax.GradientTransformation, params, param_shardings, mesh: Mesh):
    """optimizer.init(params) placed with opt_state_shardings (also returned)."""
    shardings = opt_state_shardings(optimizer, params, param_shardings, mesh)
    init = jax.jit(optimizer.init, in_shardings=(param_shardings,), out_shardings=shardings)
    return init(params), shardings


def make_step_fn(objective, apply, optimizer: optax.GradientTransformation, schedule: Callable | None = None):
    """The un-jitted pure step (params, opt_state, batch, ref_params) -> (params, opt_state, metrics)."""

    def step(params, opt_state, batch, ref_params):
        lr = None if schedule is None else jnp.asarray(schedule(optimizer_step_count(opt_state)), jnp.float32)

        def loss_fn(p):
            with training_trace():  # scan_layers="auto" may unroll the layers here (models.decoder.scans_layers)
                return objective(p, ref_params, batch, apply)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state):
            updates, new_opt_state = optimizer.update(grads, state[1], state[0])
            return optax.apply_updates(state[0], updates), new_opt_state

        # a cond, not a select: the new state is written over the donated one, never held twice
        # (a jnp.where over both trees cost 2.6 GiB per device on the Llama-3.1-8B plan)
        params, opt_state = jax.lax.cond(finite, update, lambda state: state, (params, opt_state))
        out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        out.update(loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm, finite=finite)
        if lr is not None:
            out["lr"] = lr
        return params, opt_state, out

    return step


def optimizer_step_count(opt_state) -> jax.Array:
    """Optimiser updates applied so far: MultiSteps' gradient_step if present, else the first
    `count` field in the state (0 if none)."""
    found: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        last = path[-1] if path else None
        name = getattr(last, "name", None)
        if name in ("gradient_step", "count") and name not in found:
            found[name] = leaf
    return found.get("gradient_step", found.get("count", jnp.zeros((), jnp.int32)))


def make_train_step(
    objective,
    apply,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    param_shardings,
    opt_shardings=None,
    params=None,
    schedule: Callable | None = None,
    donate: bool = True,
):
    """Jitted step with explicit shardings; params/opt_state donated, ref_params not.

    opt_shardings: the optimiser-state shardings; when None they are derived from `params`
    (arrays or ShapeDtypeStructs), which is then required.
    """
    if opt_shardings is None:
        if params is None:
            raise ValueError("make_train_step needs opt_shardings or params to derive them from")
        opt_shardings = opt_state_shardings(optimizer, params, param_shardings, mesh)
    step = make_step_fn(objective, apply, optimizer, schedule)
    return jax.jit(
        step,
        in_shardings=(param_shardings, opt_shardings, batch_sharding(mesh), param_shardings),
        out_shardings=(param_shardings, opt_shardings, replicated(mesh)),
        donate_argnums=(0, 1) if donate else (),
    )


def host_metrics(metrics: dict) -> dict[str, float | bool]:
    """Device metrics -> plain Python numbers (one host sync)."""
    values = jax.device_get(metrics)
    return {k: (bool(v) if k == "finite" else float(v)) for k, v in values.items()}


def train_loop(
    step_fn: Callable,
    state: TrainState,
    ref_params,
    batches_from: Callable[[int], Iterator[dict]],
    n_steps: int,
    on_step: Callable[[TrainState, dict], TrainState | None] | None = None,
    put_batch: Callable[[dict], dict] | None = None,
) -> TrainState:
    """Run micro-steps state.step .. n_steps-1 and return the final state.

    on_step(state, metrics) runs after every finite step with the new state (state.step already
    incremented) and host metrics; it may return a replacement state (e.g. with updated extras)
    or None. put_batch turns a host batch into device arrays (e.g. data.to_global); default:
    passed to the jitted step as is. SIGTERM/SIGINT end the loop after the step in flight with
    `Interrupted(signum, state)` (see the module docstring).
    """
    if state.step >= n_steps:
        return state
    with deferred_signals() as stop:
        return _loop(step_fn, state, ref_params, iter(batches_from(state.step)), n_steps, on_step, put_batch, stop)


def _loop(step_fn, state, ref_params, batches, n_steps, on_step, put_batch, stop: StopFlag) -> TrainState:
    while state.step < n_steps:
        if stop.signum is not None:
            raise Interrupted(stop.signum, state)
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(f"batch iterator ended at step {state.step} before n_steps={n_steps}") from None
        if put_batch is not None:
            batch = put_batch(batch)
        params, opt_state, metrics = step_fn(state.params, state.opt_state, batch, ref_params)
        metrics = host_metrics(metrics)
        if not metrics["finite"]:
            kept = dataclasses.replace(state, params=params, opt_state=opt_state)
            raise NonFiniteError(
                f"non-finite loss or gradient at step {state.step} (loss={metrics['loss']}, "
                f"grad_norm={metrics['grad_norm']}); parameters left unchanged, last good checkpoint kept",
                state=kept,
                metrics=metrics,
            )
        state = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state)
        if on_step is not None:
            replaced = on_step(state, metrics)
            if replaced is not None:
                state = replaced
    if stop.signum is not None:
        raise Interrupted(stop.signum, state)
    return state


def copy_tree(tree):
    """An independent copy of a pytree of arrays (same shardings), e.g. the frozen reference
    before the trainable copy is donated."""
    return jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else np.array(x), tree)
