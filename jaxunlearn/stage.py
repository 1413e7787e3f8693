"""One checkpointed training stage inside a run directory: train from scratch or resume.

A `Stage` names the objective, the batches (micro-step -> host batch) and where its checkpoints go;
`train_stage` runs it with the jitted step of `jaxunlearn.train`, saving params, optimiser state,
RNG key, data position (and a running momentum model) every `checkpoint.save_every` steps, so that
rerunning continues from the latest complete checkpoint and ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import jax

from jaxunlearn import checkpoint as ck
from jaxunlearn.config import RunConfig
from jaxunlearn.errors import RunError
from jaxunlearn.rundir import ModelSetup


@dataclasses.dataclass
class Stage:
    """One checkpointed training run inside a run directory."""

    name: str  # the method name (metrics.jsonl "stage")
    subdir: str  # checkpoint folder inside the run
    objective: Callable
    batch_at: Callable[[int], dict]  # micro-step -> host batch
    micro_steps_per_epoch: int
    reference_hash: str | None  # recorded in every checkpoint and checked on resume
    momentum: Callable | None = None  # (running_forget or None, ref, mem) -> running_forget
    data_tag: str | None = None  # what the stage trains on (e.g. "split full"); checked on resume
    momentum_every: int = 0  # optimiser steps between momentum updates (0: once per epoch); the last step always updates
    trainable: str = ".*"  # regex of the parameter paths the optimiser may change (objectives.rmu.trainable_mask)


def train_stage(run: pathlib.Path, cfg: RunConfig, setup: ModelSetup, stage: Stage, start_params, ref_params):
    """Train (or resume) a stage; returns (final TrainState, total micro-steps).

    start_params are used only when the stage has no checkpoint yet (they may be donated).
    SIGTERM/SIGINT: the step in flight finishes, a checkpoint of it is written (unless that step
    was just saved) and `interrupt.Interrupted` propagates to the CLI (exit 143 / 130).
    """
    from jaxunlearn import optim, train
    from jaxunlearn.interrupt import Interrupted
    from jaxunlearn.progress import Progress
    from jaxunlearn.data import host_slice, to_global
    from jaxunlearn.objectives.common import with_loss_chunk
    from jaxunlearn.sharding import batch_sharding, check_batch_divisible

    check_batch_divisible(cfg.train.batch_size, setup.mesh, "train.batch_size")
    optimizer, schedule, plan = optim.optimizer_from_spec(cfg.train, stage.micro_steps_per_epoch)
    if stage.trainable != ".*":
        from jaxunlearn.objectives.rmu import trainable_mask

        optimizer = optim.keep_frozen(optimizer, trainable_mask(setup.abstract, stage.trainable))
    opt_shardings = train.opt_state_shardings(optimizer, setup.abstract, setup.shardings, setup.mesh)
    step_fn = train.make_train_step(
        stage.objective, with_loss_chunk(setup.apply, cfg.train.loss_chunk), optimizer, setup.mesh, setup.shardings,
        opt_shardings, schedule=schedule
    )
    n_steps = plan.total_micro_steps
    save_every = cfg.checkpoint.save_every * cfg.train.grad_accum
    momentum_every = (stage.momentum_every or plan.steps_per_epoch) * cfg.train.grad_accum
    if stage.momentum is not None and momentum_every > n_steps:  # a momentum run with no blending at all
        raise RunError(f"method.momentum_every: {momentum_every // cfg.train.grad_accum} optimiser steps between "
                       f"momentum updates, but the run has only {plan.total_steps}; no momentum update would happen")
    base_key = jax.random.key(cfg.train.seed)

    mgr = ck.MemorizedCheckpoints(run, cfg.checkpoint.keep, cfg.checkpoint.async_save, subdir=stage.subdir)
    try:
        state = _start_state(run, mgr, setup, stage, optimizer, opt_shardings, start_params, ref_params, base_key)
        bar = Progress(total=n_steps, initial=state.step, desc=stage.name, silent=not ck.is_primary())
        saved = {state.step}  # steps with a checkpoint (finalised or in flight)

        def on_step(st, metrics):
            bar.update(st.step, metrics.get("loss"))
            extras = dict(st.extras, rng=jax.random.fold_in(base_key, st.step))
            # the momentum model blends every momentum_every steps and at the last step, so it includes the final update
            if stage.momentum is not None and (st.step % momentum_every == 0 or st.step == n_steps):
                prev = extras["momentum"] if extras["momentum_updates"] else None
                extras["momentum"] = stage.momentum(prev, ref_params, st.params)
                extras["momentum_updates"] += 1
            st = dataclasses.replace(st, extras=extras)
            if st.step % cfg.train.log_every == 0 or st.step == n_steps:
                record = {"stage": stage.name, "step": st.step, "epoch": st.step / stage.micro_steps_per_epoch}
                ck.append_metrics(run, dict(record, **metrics))
            if st.step % save_every == 0 or st.step == n_steps:
                _save(mgr, st, stage, plan)
                saved.add(st.step)
            return st

        batch_shard = batch_sharding(setup.mesh)
        try:
            state = train.train_loop(
                step_fn,
                state,
                ref_params,
                lambda k: (stage.batch_at(i) for i in range(k, n_steps)),
                n_steps,
                on_step=on_step,
                put_batch=lambda b: to_global(host_slice(b), batch_shard),
            )
        except Interrupted as stop:
            bar.close()
            if stop.state is not None and stop.state.step not in saved:
                _save(mgr, stop.state, stage, plan)
            mgr.wait_until_finished()
            raise
        bar.close()
        mgr.wait_until_finished()
        return state, n_steps
    finally:
        mgr.close()


def _opt_item(state) -> dict:
    item = {"opt": state.opt_state}
    if "momentum" in state.extras:
        item["momentum"] = state.extras["momentum"]
    return item


def _save(mgr: ck.MemorizedCheckpoints, state, stage: Stage, plan) -> None:
    position = {
        "step": state.step,
        "epoch": state.step // stage.micro_steps_per_epoch,
        "optimizer_step": state.step // plan.grad_accum,
        "reference_hash": stage.reference_hash,
        "momentum_updates": state.extras.get("momentum_updates", 0),
        "data": stage.data_tag,
    }
    mgr.save(state.step, state.params, _opt_item(state), state.extras["rng"], position)


def _start_state(run, mgr, setup, stage, optimizer, opt_shardings, start_params, ref_params, base_key):
    from jaxunlearn import train

    opt_abstract = ck.abstract_tree(jax.eval_shape(optimizer.init, setup.abstract), opt_shardings)
    target = {"opt": opt_abstract}
    if stage.momentum is not None:
        target["momentum"] = setup.abstract
    if mgr.latest_step() is not None:
        got = mgr.restore(setup.abstract, target)
        recorded = got["position"].get("reference_hash")
        if recorded != stage.reference_hash:
            raise ck.HashMismatchError(
                f"{mgr.directory}/{got['step']}: checkpoint was trained against reference "
                f"{str(recorded)[:12]}, but the run's reference is {str(stage.reference_hash)[:12]}"
            )
        trained_on = got["position"].get("data")
        if trained_on != stage.data_tag:
            raise RunError(
                f"{mgr.directory}/{got['step']}: checkpoint was trained on {trained_on}, this command asks for "
                f"{stage.data_tag}; use a new run directory, or --overwrite to start this one afresh"
            )
        # steps logged after this checkpoint (before an interruption) are logged again below: drop them
        ck.truncate_metrics(run, stage.name, got["step"])
        ck.append_metrics(run, {"stage": stage.name, "event": "resume", "step": got["step"]})
        extras = {"rng": got["rng"]}
        if stage.momentum is not None:
            extras["momentum"] = got["opt_state"]["momentum"]
            extras["momentum_updates"] = int(got["position"].get("momentum_updates", 0))
        return train.TrainState(got["step"], got["params"], got["opt_state"]["opt"], extras)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(start_params)
    extras = {"rng": base_key}
    if stage.momentum is not None:  # placeholder until the first update (which ignores it)
        extras["momentum"], extras["momentum_updates"] = train.copy_tree(ref_params), 0
    return train.TrainState(0, start_params, opt_state, extras)
