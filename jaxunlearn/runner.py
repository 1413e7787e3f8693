"""Command-line runs: finetune, unlearn (MOX), extrapolate, export-hf.

    jaxunlearn finetune [CONFIG.yaml] [key=value ...] --run DIR [--split full] [--hf-out DIR]
    jaxunlearn unlearn  [CONFIG.yaml] [key=value ...] --run DIR [--reference PATH] [--overwrite]
    jaxunlearn extrapolate --run DIR [--alpha A [A ...]] [--step S] [--overwrite]
    jaxunlearn export-hf --run DIR --which forget|memorized|reference [--alpha A] [--eta E] [--step S] --out DIR

A run directory is laid out as in `jaxunlearn.checkpoint`. `finetune` trains a model on a
benchmark split (from an HF folder, `model.hf_folder`, or a random initialisation of
`model.preset`), checkpointing to RUN/finetune/, and writes the result as RUN/reference, so its
run directory (or the HF folder of --hf-out) is the reference of a later `unlearn`.
`unlearn` takes its reference from, in order: RUN/reference if present, --reference (a run
directory or an HF folder), `model.hf_folder`, or a random initialisation of `model.preset`; it
trains the memorisation model (RUN/memorized/) and writes the forget model for `mox.alpha`
(and the momentum forget model when `mox.momentum`).

Resume: rerunning the same command continues from the latest complete checkpoint (params,
optimiser state, RNG key, data position and, with momentum, the running forget model), so the
result is bitwise equal to an uninterrupted run. A rerun whose resolved config differs from
RUN/config.yaml is refused, except in keys that do not change the result (checkpointing,
logging, run_dir; see RESULT_NEUTRAL_KEYS).

Every expected failure (bad config, missing run, hash mismatch, non-finite step) ends with one
line on stderr and exit status 1 (JAXUNLEARN_DEBUG=1 shows the traceback instead);
checkpoints already written are kept.

Python API used by the demo and tests: `finetune(cfg, run, split)`, `unlearn(cfg, run, reference)`,
`extrapolate_run(run, alphas)`, `export_run(run, which, out)`; `load_run_params(run, which)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxunlearn import checkpoint as ck
from jaxunlearn.config import RunConfig, from_dict, load_config, to_dict

FINETUNE_DIR = "finetune"


# config keys a rerun may change: they do not affect the parameters a run produces
RESULT_NEUTRAL_KEYS = ("run_dir", "checkpoint.", "train.log_every")


class RunConfigMismatchError(ValueError):
    """A rerun's config differs from the one the run directory was started with."""


# ----------------------------------------------------------------------------- building blocks


def load_benchmark(data_spec):
    """The UnlearnBenchmark named by a DataSpec."""
    from jaxunlearn import data

    if data_spec.benchmark == "synthetic":
        return data.synthetic_benchmark(seed=data_spec.synthetic_seed, n_entities=data_spec.synthetic_entities)
    if data_spec.benchmark == "tofu":
        from jaxunlearn.data import tofu

        return tofu.tofu_benchmark(data_spec.forget_split, source=data_spec.source)
    if data_spec.benchmark == "muse":
        from jaxunlearn.data import muse

        return muse.muse_benchmark("news", source=data_spec.source, privleak=False)
    raise ValueError(f"data.benchmark: {data_spec.benchmark!r} has no loader for training runs")


def load_tokenizer(cfg: RunConfig, bench, fallback_folder: str | None = None):
    """data.tokenizer, else the HF model folder's tokenizer, else `fallback_folder` (e.g. that of
    the reference), else a BPE tokenizer built on the benchmark."""
    folder = cfg.data.tokenizer or cfg.model.hf_folder or fallback_folder
    if folder:
        from transformers import AutoTokenizer

        if not pathlib.Path(folder).is_dir():
            raise ck.RunNotFoundError(f"tokenizer folder not found: {folder}")
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        from jaxunlearn.data import synthetic_tokenizer

        tok = synthetic_tokenizer(bench)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def preset_model_config(cfg: RunConfig, tokenizer):
    """ModelConfig of cfg.model.preset sized for `tokenizer`."""
    from jaxunlearn.models import ModelConfig

    return ModelConfig.preset(
        cfg.model.preset,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@dataclasses.dataclass
class ModelSetup:
    """Everything needed to place, restore and run one model shape on one mesh."""

    model_cfg: Any  # models.ModelConfig
    mesh: jax.sharding.Mesh
    graphdef: Any
    abstract: Any  # params as ShapeDtypeStructs carrying their shardings
    shardings: Any
    apply: Callable


def model_setup(model_cfg, cfg: RunConfig, mesh=None) -> ModelSetup:
    from flax import nnx

    from jaxunlearn.models import init_model, make_apply, param_logical_axes, split_params
    from jaxunlearn.sharding import make_mesh, param_shardings

    if mesh is None:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    # how the model runs comes from the run config (never from a checkpoint's config.json)
    model_cfg = model_cfg.replace(scan_layers=cfg.model.scan_layers, remat=cfg.model.remat,
                                  attention=cfg.model.attention)
    model = nnx.eval_shape(lambda: init_model(model_cfg, 0, cfg.model.dtype, cfg.model.param_dtype))
    graphdef, abstract = split_params(model)
    shardings = param_shardings(param_logical_axes(abstract), mesh, abstract)
    return ModelSetup(model_cfg, mesh, graphdef, ck.abstract_tree(abstract, shardings), shardings,
                      make_apply(graphdef, mesh))


def initial_params(cfg: RunConfig, tokenizer, mesh=None) -> tuple[ModelSetup, Any, dict]:
    """Starting parameters from cfg.model (HF folder or preset init), placed on the mesh."""
    from jaxunlearn.models import init_model, split_params

    if cfg.model.hf_folder:
        from jaxunlearn.models import hf

        model = hf.load_hf(cfg.model.hf_folder, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
        setup = model_setup(model.config, cfg, mesh)
        params = jax.device_put(split_params(model)[1], setup.shardings)
        return setup, params, {"hf_folder": str(cfg.model.hf_folder)}
    model_cfg = preset_model_config(cfg, tokenizer)
    setup = model_setup(model_cfg, cfg, mesh)
    seed, dtype, param_dtype = cfg.model.init_seed, cfg.model.dtype, cfg.model.param_dtype
    init = jax.jit(lambda: split_params(init_model(model_cfg, seed, dtype, param_dtype))[1], out_shardings=setup.shardings)
    return setup, init(), {"preset": cfg.model.preset, "init_seed": seed}


def reference_meta(setup: ModelSetup, source: dict, tokenizer=None) -> dict:
    folder = getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None
    # recorded absolute, so a rerun from another working directory finds it
    folder = str(pathlib.Path(folder).absolute()) if folder and pathlib.Path(folder).is_dir() else None
    return {"model_config": setup.model_cfg.to_hf_dict(), "source": source, "tokenizer": folder}


def run_tokenizer(run: str | pathlib.Path):
    """The tokenizer a run was trained with (its config's, else the one recorded with its reference)."""
    run = pathlib.Path(run)
    cfg = from_dict(ck.read_config(run), where=str(run / ck.CONFIG_FILE))
    recorded = ck.read_meta(ck.reference_path(run)).get("tokenizer") if ck.has_reference(run) else None
    return load_tokenizer(cfg, load_benchmark(cfg.data), recorded)


def setup_from_meta(meta: dict, cfg: RunConfig, folder: pathlib.Path, mesh=None) -> ModelSetup:
    from jaxunlearn.models import ModelConfig

    if "model_config" not in meta:
        raise ck.CheckpointError(f"{folder}/{ck.META_FILE}: no model_config recorded")
    return model_setup(ModelConfig.from_hf_dict(meta["model_config"], source=str(folder)), cfg, mesh)


def encode(tokenizer, cfg: RunConfig, rows: list) -> list[dict]:
    """QA rows -> answer-scored examples; raw texts (MUSE) -> max_len chunks scored on every token
    (data.encode_texts, the chunking the MUSE evaluation uses)."""
    from jaxunlearn.data import encode_rows, encode_texts, prompt_format_for

    if rows and isinstance(rows[0], str):
        return encode_texts(tokenizer, rows, cfg.data.max_len)
    fmt = prompt_format_for(tokenizer, cfg.data.prompt_format)
    return encode_rows(tokenizer, fmt, rows, cfg.data.max_len)


# ----------------------------------------------------------------------------- run directory


def resolve_run(cfg: RunConfig, run: str | None) -> tuple[RunConfig, pathlib.Path]:
    run = run or cfg.run_dir
    if not run:
        raise ValueError("no run directory: pass --run DIR or set run_dir in the config")
    return dataclasses.replace(cfg, run_dir=str(run)), pathlib.Path(run)


def check_or_write_config(cfg: RunConfig, run: pathlib.Path) -> None:
    """Write RUN/config.yaml, or check that a rerun uses the same resolved config."""
    new = to_dict(cfg)
    if (run / ck.CONFIG_FILE).exists():
        old = to_dict(from_dict(ck.read_config(run), where=str(run / ck.CONFIG_FILE)))
        diff = sorted(k for k in _diff_keys(old, new) if not k.startswith(RESULT_NEUTRAL_KEYS))
        if diff:
            raise RunConfigMismatchError(
                f"{run / ck.CONFIG_FILE}: this command's config differs at {', '.join(diff)}; "
                "rerun with the original settings or use a new run directory"
            )
        return
    run.mkdir(parents=True, exist_ok=True)
    ck.write_config(run, new)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.add(f"{prefix}{k}")
    return out


# ----------------------------------------------------------------------------- training stage


@dataclasses.dataclass
class Stage:
    """One checkpointed training run inside a run directory."""

    name: str  # "finetune" | "memorize"
    subdir: str  # checkpoint folder inside the run
    objective: Callable
    batch_at: Callable[[int], dict]  # micro-step -> host batch
    micro_steps_per_epoch: int
    reference_hash: str | None  # recorded in every checkpoint and checked on resume
    momentum: Callable | None = None  # (running_forget or None, ref, mem) -> running_forget


def train_stage(run: pathlib.Path, cfg: RunConfig, setup: ModelSetup, stage: Stage, start_params, ref_params):
    """Train (or resume) a stage; returns (final TrainState, total micro-steps).

    start_params are used only when the stage has no checkpoint yet (they may be donated).
    """
    from tqdm import tqdm

    from jaxunlearn import optim, train
    from jaxunlearn.data import host_slice, to_global
    from jaxunlearn.objectives.common import with_loss_chunk
    from jaxunlearn.sharding import batch_sharding, check_batch_divisible

    check_batch_divisible(cfg.train.batch_size, setup.mesh, "train.batch_size")
    optimizer, schedule, plan = optim.optimizer_from_spec(cfg.train, stage.micro_steps_per_epoch)
    opt_shardings = train.opt_state_shardings(optimizer, setup.abstract, setup.shardings, setup.mesh)
    apply = with_loss_chunk(setup.apply, cfg.train.loss_chunk)
    step_fn = train.make_train_step(
        stage.objective, apply, optimizer, setup.mesh, setup.shardings, opt_shardings, schedule=schedule
    )
    n_steps = plan.total_micro_steps
    save_every = cfg.checkpoint.save_every * cfg.train.grad_accum
    momentum_every = (cfg.mox.momentum_every or plan.steps_per_epoch) * cfg.train.grad_accum
    if stage.momentum is not None and momentum_every > n_steps:  # else the "momentum model" is the reference
        raise ValueError(f"mox.momentum_every: {momentum_every // cfg.train.grad_accum} optimiser steps between momentum "
                         f"updates, but the run has only {plan.total_steps}; no momentum update would happen")
    base_key = jax.random.key(cfg.train.seed)

    mgr = ck.MemorizedCheckpoints(run, cfg.checkpoint.keep, cfg.checkpoint.async_save, subdir=stage.subdir)
    try:
        state = _start_state(run, mgr, setup, stage, optimizer, opt_shardings, start_params, ref_params, base_key)
        bar = tqdm(total=n_steps, initial=state.step, desc=stage.name, disable=None, leave=False)

        def on_step(st, metrics):
            bar.update(1)
            extras = dict(st.extras, rng=jax.random.fold_in(base_key, st.step))
            if stage.momentum is not None and st.step % momentum_every == 0:
                prev = extras["momentum"] if extras["momentum_updates"] else None
                extras["momentum"] = stage.momentum(prev, ref_params, st.params)
                extras["momentum_updates"] += 1
            st = dataclasses.replace(st, extras=extras)
            if st.step % cfg.train.log_every == 0 or st.step == n_steps:
                record = {"stage": stage.name, "step": st.step, "epoch": st.step / stage.micro_steps_per_epoch}
                ck.append_metrics(run, dict(record, **metrics))
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if st.step % save_every == 0 or st.step == n_steps:
                _save(mgr, st, stage, plan)
            return st

        batch_shard = batch_sharding(setup.mesh)
        state = train.train_loop(
            step_fn,
            state,
            ref_params,
            lambda k: (stage.batch_at(i) for i in range(k, n_steps)),
            n_steps,
            on_step=on_step,
            put_batch=lambda b: to_global(host_slice(b), batch_shard),
        )
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


# ----------------------------------------------------------------------------- commands (Python API)


def finetune(cfg: RunConfig, run: str | pathlib.Path | None = None, split: str = "full") -> pathlib.Path:
    """Fine-tune cfg.model on benchmark split `split`; RUN/reference holds the result."""
    from jaxunlearn.data import PairedIterator
    from jaxunlearn.objectives import get_objective

    cfg, run = resolve_run(dataclasses.replace(cfg, method="finetune"), run)
    bench = load_benchmark(cfg.data)
    rows = getattr(bench, split, None)
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], (dict, str)):
        raise ValueError(f"--split {split!r}: not a non-empty split of benchmark {bench.name}")
    check_or_write_config(cfg, run)
    tokenizer = load_tokenizer(cfg, bench)
    setup, params, source = initial_params(cfg, tokenizer)
    examples = encode(tokenizer, cfg, rows)
    it = PairedIterator(examples, examples, cfg.train.batch_size, cfg.train.seed, cfg.data.buckets, tokenizer.pad_token_id)
    stage = Stage(
        name="finetune",
        subdir=FINETUNE_DIR,
        objective=get_objective("finetune"),
        batch_at=lambda i: {"train": it.batch_at(i)["forget"]},
        micro_steps_per_epoch=it.steps_per_epoch,
        reference_hash=None,
    )
    from jaxunlearn.train import copy_tree

    # the finetune objective ignores ref_params; a separate copy keeps the donated buffers apart
    state, _ = train_stage(run, cfg, setup, stage, params, copy_tree(params))
    meta = reference_meta(setup, dict(source, finetuned_on=split, steps=state.step), tokenizer)
    if ck.has_reference(run):
        ck.verify_reference(run, state.params)
    else:
        ck.save_reference(run, state.params, meta)
    ck.append_metrics(run, {"stage": "finetune", "event": "reference_written", "hash": ck.reference_hash(run)})
    return run


def reference_tokenizer_folder(reference: str | None) -> str | None:
    """The tokenizer folder implied by --reference: an HF folder itself, or that of the run's config."""
    if reference is None:
        return None
    path = pathlib.Path(reference)
    if ck.has_reference(path) and (path / ck.CONFIG_FILE).exists():
        ref_cfg = from_dict(ck.read_config(path), where=str(path / ck.CONFIG_FILE))
        return ref_cfg.data.tokenizer or ref_cfg.model.hf_folder
    if (path / "config.json").exists() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        return str(path)
    return None


def reference_for(cfg: RunConfig, run: pathlib.Path, reference: str | None, tokenizer) -> tuple[ModelSetup, Any, str]:
    """(setup, reference params, hash) for an unlearning run; writes RUN/reference the first time."""
    given = None
    if reference is not None:
        ref_path = pathlib.Path(reference)
        if ck.has_reference(ref_path):
            meta = ck.read_meta(ck.reference_path(ref_path))
            setup = setup_from_meta(meta, cfg, ck.reference_path(ref_path))
            params, _ = ck.load_reference(ref_path, setup.abstract)
            given = (setup, params, {"run": str(ref_path)})
        elif (ref_path / "config.json").exists():
            given = initial_params(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_folder=str(ref_path))), tokenizer)
        else:
            raise ck.RunNotFoundError(f"--reference {ref_path}: neither a run with a reference nor an HF folder")
    if ck.has_reference(run):
        meta = ck.read_meta(ck.reference_path(run))
        setup = setup_from_meta(meta, cfg, ck.reference_path(run))
        params, meta = ck.load_reference(run, setup.abstract)
        if given is not None:
            ck.verify_reference(run, given[1])
        return setup, params, meta["hash"]
    setup, params, source = initial_params(cfg, tokenizer) if given is None else given
    digest = ck.save_reference(run, params, reference_meta(setup, source, tokenizer))
    return setup, params, digest


def cast_reference(params, dtype: str | None):
    """The frozen reference as held during training: floating leaves cast to `dtype` (same
    shardings); `params` itself when dtype is None or every floating leaf already has it."""
    if dtype is None:
        return params
    floating = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    if all(x.dtype == jnp.dtype(dtype) for x in floating):
        return params
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def unlearn(
    cfg: RunConfig, run: str | pathlib.Path | None = None, reference: str | None = None, overwrite: bool = False
) -> pathlib.Path:
    """Memorise the forget set from the reference and write the forget model(s)."""
    from jaxunlearn import extrapolate as ex
    from jaxunlearn.data import PairedIterator, target_rows
    from jaxunlearn.objectives import objective_from_spec
    from jaxunlearn.train import copy_tree

    cfg, run = resolve_run(cfg, run)
    if cfg.method != "mox":
        raise ValueError(f"method: {cfg.method!r} is not available here (unlearn runs method 'mox')")
    ex.get_rule(cfg.mox.rule)  # an unknown rule must fail now, not after the whole memorisation run
    check_or_write_config(cfg, run)
    bench = load_benchmark(cfg.data)
    # a rerun (maybe without --reference) keeps the tokenizer recorded with the run's reference
    recorded = ck.read_meta(ck.reference_path(run)).get("tokenizer") if ck.has_reference(run) else None
    tokenizer = load_tokenizer(cfg, bench, recorded or reference_tokenizer_folder(reference))
    setup, ref_params, ref_hash = reference_for(cfg, run, reference, tokenizer)
    if len(tokenizer) > setup.model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the reference model's vocab_size is "
                         f"{setup.model_cfg.vocab_size}; set data.tokenizer to the reference's tokenizer")
    forget, retain = encode(tokenizer, cfg, bench.forget), encode(tokenizer, cfg, bench.retain)
    target = None
    if cfg.mox.objective == "mox_targeted" or cfg.data.target:
        if not hasattr(bench, "idk"):
            raise ValueError(f"mox.objective {cfg.mox.objective!r}: benchmark {bench.name} has no target answers")
        target = encode(tokenizer, cfg, target_rows(bench.forget, bench.idk, cfg.train.seed))
    it = PairedIterator(
        forget, retain, cfg.train.batch_size, cfg.train.seed, cfg.data.buckets, tokenizer.pad_token_id, target
    )
    alpha, eta = cfg.mox.alpha, cfg.mox.eta
    momentum = None
    if cfg.mox.momentum:
        momentum = lambda prev, ref, mem: ex.momentum_update(prev, ref, mem, alpha, eta, cfg.mox.rule)  # noqa: E731
    stage = Stage(
        name="memorize",
        subdir=ck.MEMORIZED_DIR,
        objective=objective_from_spec(cfg.mox),
        batch_at=it.batch_at,
        micro_steps_per_epoch=it.steps_per_epoch,
        reference_hash=ref_hash,
        momentum=momentum,
    )
    with ck.MemorizedCheckpoints(run, subdir=ck.MEMORIZED_DIR) as mgr:
        fresh = mgr.latest_step() is None
    start = copy_tree(ref_params) if fresh else None  # the trainable copy (donated by the step)
    step_ref = cast_reference(ref_params, cfg.model.reference_dtype)  # after its hash was checked
    cast = step_ref is not ref_params
    del ref_params  # with a cast, the stored-precision reference leaves the devices while training
    state, n_steps = train_stage(run, cfg, setup, stage, start, step_ref)
    # extrapolation uses the stored reference (hash-verified again), never the cast one
    ref_params = ck.load_reference(run, setup.abstract)[0] if cast else step_ref
    write_forget(run, ref_params, state.params, alpha, n_steps, overwrite, cfg.mox.rule)
    if cfg.mox.momentum:
        _write_forget_params(run, state.extras["momentum"], alpha, n_steps, eta, overwrite, cfg.mox.rule)
    return run


def write_forget(
    run, ref_params, mem_params, alpha: float, source_step: int, overwrite: bool = False, rule: str = "linear"
) -> pathlib.Path:
    """theta_ref + alpha * (theta_ref - theta_mem) saved as RUN/forget/alpha_A (mem_params kept intact)."""
    from jaxunlearn import extrapolate as ex

    forget = ex.extrapolate(ref_params, mem_params, alpha, rule, donate=False)
    return _write_forget_params(run, forget, alpha, source_step, None, overwrite, rule)


def _write_forget_params(run, params, alpha, source_step, eta, overwrite, rule: str = "linear") -> pathlib.Path:
    path = ck.forget_path(run, alpha, eta)
    if not overwrite and (path / ck.META_FILE).exists():
        meta = ck.read_meta(path)
        if meta.get("hash") == ck.params_hash(params) and meta.get("source_step") == source_step:
            return path  # a rerun that computed the same forget model
    path = ck.save_forget(run, params, alpha, source_step, eta=eta, meta={"rule": rule}, overwrite=overwrite)
    ck.append_metrics(run, {"event": "forget_written", "alpha": alpha, "eta": eta, "source_step": source_step})
    return path


def run_setup(run: pathlib.Path, mesh=None) -> tuple[RunConfig, ModelSetup]:
    """The run's config and model setup (from RUN/config.yaml and RUN/reference/meta.json)."""
    ck.require_run(run)
    cfg = from_dict(ck.read_config(run), where=str(run / ck.CONFIG_FILE))
    if not ck.has_reference(run):
        raise ck.RunNotFoundError(f"{ck.reference_path(run)}: run has no complete reference checkpoint")
    setup = setup_from_meta(ck.read_meta(ck.reference_path(run)), cfg, ck.reference_path(run), mesh)
    return cfg, setup


def load_run_params(
    run, which: str, alpha: float | None = None, eta: float | None = None, step: int | None = None, mesh=None
) -> tuple[ModelSetup, Any, dict]:
    """(setup, params, info) for which = reference | memorized | forget of a run (hash-verified)."""
    run = pathlib.Path(run)
    cfg, setup = run_setup(run, mesh)
    if which == "reference":
        params, meta = ck.load_reference(run, setup.abstract)
        return setup, params, meta
    if which == "memorized":
        subdir = FINETUNE_DIR if cfg.method == "finetune" else ck.MEMORIZED_DIR
        mgr = ck.MemorizedCheckpoints(run, subdir=subdir)
        try:
            got = mgr.restore(setup.abstract, step=step)
        finally:
            mgr.close()
        return setup, got["params"], got["position"]
    if which == "forget":
        alpha = cfg.mox.alpha if alpha is None else alpha
        params, meta = ck.load_forget(run, alpha, setup.abstract, eta=eta)
        return setup, params, meta
    raise ValueError(f"--which {which!r}: expected forget, memorized or reference")


def extrapolate_run(
    run, alphas: list[float] | None = None, step: int | None = None, overwrite: bool = False
) -> list[pathlib.Path]:
    """Write RUN/forget/alpha_A for every alpha (default: the run's mox.alphas) from the
    reference and a memorised step (default: the latest)."""
    run = pathlib.Path(run)
    cfg, _ = run_setup(run)
    setup, ref_params, _ = load_run_params(run, "reference")
    _, mem_params, position = load_run_params(run, "memorized", step=step, mesh=setup.mesh)
    if position.get("reference_hash") != ck.reference_hash(run):
        raise ck.HashMismatchError(f"{run}/{ck.MEMORIZED_DIR}: memorised step was not trained from this run's reference")
    alphas = list(cfg.mox.alphas) if not alphas else alphas
    return [write_forget(run, ref_params, mem_params, a, position["step"], overwrite, cfg.mox.rule) for a in alphas]


def export_run(run, which: str, out, alpha: float | None = None, eta: float | None = None, step: int | None = None):
    """Export a run's parameters (and its tokenizer, when it can be rebuilt) as an HF folder."""
    from jaxunlearn.models import hf, merge_params

    run = pathlib.Path(run)
    setup, params, _ = load_run_params(run, which, alpha, eta, step)
    out = pathlib.Path(out)
    hf.export_hf(merge_params(setup.graphdef, jax.device_get(params)), out)
    run_tokenizer(run).save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------- CLI


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                        help="optional YAML config followed by dotted key=value overrides")
    parser.add_argument("--run", help="run directory (default: run_dir of the config)")


def _load_cli_config(args: list[str]) -> RunConfig:
    path = None
    if args and "=" not in args[0]:
        path, args = args[0], args[1:]
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ValueError(f"expected key=value overrides after the config file, got {bad}")
    return load_config(path, args)


def _cli(prog: str, body: Callable[[], Any]) -> int:
    """Run a command body, turning expected failures into one stderr line and exit status 1."""
    from jaxunlearn.train import NonFiniteError

    try:
        body()
        return 0
    except (ValueError, OSError, NonFiniteError) as e:
        if os.environ.get("JAXUNLEARN_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"jaxunlearn {prog}: error: {msg}", file=sys.stderr)
        return 1


def finetune_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn finetune", description="train a reference or retain model")
    _config_args(p)
    p.add_argument("--split", default="full", help="benchmark split to train on (full, retain, forget, ...)")
    p.add_argument("--hf-out", help="also export the trained model as an HF folder here")
    a = p.parse_args(argv)

    def body():
        run = finetune(_load_cli_config(a.args), a.run, a.split)
        if a.hf_out:
            export_run(run, "reference", a.hf_out)
        print(f"reference written to {ck.reference_path(run)}")

    return _cli("finetune", body)


def unlearn_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn unlearn", description="MOX unlearning: memorise then extrapolate")
    _config_args(p)
    p.add_argument("--reference", help="run directory or HF folder of the reference (if RUN has none yet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different forget checkpoint")
    a = p.parse_args(argv)

    def body():
        run = unlearn(_load_cli_config(a.args), a.run, a.reference, a.overwrite)
        for m in ck.list_forget(run):
            print(f"forget model (alpha={m['alpha']}, eta={m['eta']}, step {m['source_step']}): {m['path']}")

    return _cli("unlearn", body)


def extrapolate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn extrapolate", description="write forget models for given alphas")
    p.add_argument("--run", required=True)
    p.add_argument("--alpha", type=float, nargs="+", help="alphas to write (default: mox.alphas of the run)")
    p.add_argument("--step", type=int, help="memorised step to use (default: latest)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)

    def body():
        for path in extrapolate_run(a.run, a.alpha, a.step, a.overwrite):
            print(path)

    return _cli("extrapolate", body)


def export_hf_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn export-hf", description="export run parameters as an HF folder")
    p.add_argument("--run", required=True)
    p.add_argument("--which", choices=("forget", "memorized", "reference"), default="forget")
    p.add_argument("--alpha", type=float, help="forget model's alpha (default: mox.alpha of the run)")
    p.add_argument("--eta", type=float, help="momentum forget model's eta")
    p.add_argument("--step", type=int, help="memorised step (default: latest)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    def body():
        print(export_run(a.run, a.which, a.out, a.alpha, a.eta, a.step))

    return _cli("export-hf", body)

