"""The training commands: finetune, unlearn (any method), continual, extrapolate, export-hf.

    jaxunlearn finetune [CONFIG.yaml] [key=value ...] --run DIR [--split full] [--hf-out DIR] [--overwrite]
    jaxunlearn unlearn  [CONFIG.yaml] [method=NAME method.KEY=V ...] --run DIR [--reference PATH|random] [--overwrite]
    jaxunlearn continual [CONFIG.yaml] [key=value ...] --run DIR --stages forget01 forget05 forget10 [--reference PATH|random]
    jaxunlearn extrapolate --run DIR [--alpha A [A ...]] [--step S] [--overwrite]
    jaxunlearn export-hf --run DIR [--which result|forget|trained|reference] [--alpha A] [--eta E] [--step S] --out DIR

(key=value overrides may also follow --run.) A run directory is laid out as in `jaxunlearn.checkpoint`. `finetune` trains a model on a
benchmark split (from an HF folder, `model.hf_folder`, or a random initialisation of
`model.preset`), checkpointing to RUN/finetune/, and writes the result as RUN/reference, so its
run directory (or the HF folder of --hf-out) is the reference of a later `unlearn`.
`unlearn` takes its reference from, in order: RUN/reference if present, --reference (a run
directory, meaning its result model, or an HF folder), `model.hf_folder`, or, only when asked for
with `--reference random`, a random initialisation of `model.preset` (without any of these it is
refused); it trains the method's objective (jaxunlearn.methods) in the
method's stage folder and then, for MOX and task vector, writes the forget model for
`method.alpha` (and the momentum forget model when `method.momentum`). RUN/result.json then names
the result model. `continual` runs `unlearn` once per forget split, each stage in RUN/K-SPLIT
starting from the previous stage's result model.

Resume: rerunning the same command continues from the latest complete checkpoint (params,
optimiser state, RNG key, data position and, with momentum, the running forget model), so the
result is bitwise equal to an uninterrupted run. A rerun whose resolved config differs from
RUN/config.yaml is refused, except in keys that do not change the result (checkpointing,
logging, run_dir; see RESULT_NEUTRAL_KEYS). `--overwrite` (finetune, unlearn, continual) starts the
run directory afresh instead (see `start_afresh`); for `extrapolate` it replaces forget models.

Writers hold RUN/.lock (jaxunlearn.lock) for the whole command: a second writer fails at once.

Expected failures raise a `jaxunlearn.errors.JaxunlearnError`; the `jaxunlearn` command prints
them as one line and exits 1 (see jaxunlearn.cli). Checkpoints already written are kept.

Python API used by the demo and tests: `finetune(cfg, run, split)`, `unlearn(cfg, run, reference)`,
`continual(cfg, run, stages, reference)`, `extrapolate_run(run, alphas)`, `export_run(run, which, out)`;
`jaxunlearn.rundir.load_run_params(run, which)` loads any model of a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp

from jaxunlearn import checkpoint as ck
from jaxunlearn.config import ConfigError, MethodSpec, RunConfig, check_alpha, load_config, to_dict
from jaxunlearn.errors import JaxunlearnError, RunError
from jaxunlearn.lock import run_lock
from jaxunlearn.methods import METHODS, get_method
from jaxunlearn.rundir import (RESULT_FILE, check_max_len, check_or_write_config, check_reference_source, encode,
                               initial_params, load_benchmark, load_run_params, load_tokenizer, reference_for,
                               read_run_config, reference_meta, reference_tokenizer_folder, resolve_run, run_setup,
                               run_tokenizer, write_result)
from jaxunlearn.rundir import WHICH, describe_result
from jaxunlearn.stage import Stage, train_stage


def start_afresh(run: pathlib.Path) -> None:
    """Remove what an earlier command wrote into RUN (config, reference, every method's checkpoints,
    forget models, result, metrics); other files (e.g. evaluation results) stay. Used by --overwrite,
    under the run lock."""
    import shutil

    from jaxunlearn.distributed import barrier

    names = {ck.CONFIG_FILE, ck.REFERENCE_DIR, ck.FORGET_DIR, ck.METRICS_FILE, RESULT_FILE}
    names |= {m.stage_dir for m in METHODS.values()}
    if ck.is_primary():
        for name in sorted(names):
            path = run / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    barrier("start_afresh")


# ----------------------------------------------------------------------------- commands (Python API)


def finetune(
    cfg: RunConfig, run: str | pathlib.Path | None = None, split: str = "full", overwrite: bool = False
) -> pathlib.Path:
    """Fine-tune cfg.model on benchmark split `split`; RUN/reference holds the result.

    overwrite: start RUN afresh (see start_afresh) instead of resuming or refusing a different setting.
    """
    cfg, run = resolve_run(dataclasses.replace(cfg, method=MethodSpec("finetune")), run)
    bench = load_benchmark(cfg.data)
    rows = getattr(bench, split, None)
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], (dict, str)):
        raise RunError(f"--split {split!r}: not a non-empty split of benchmark {bench.name}")
    with run_lock(run, "jaxunlearn finetune"):
        if overwrite:
            start_afresh(run)
        if ck.has_reference(run):
            done_on = ck.read_meta(ck.reference_path(run)).get("source", {}).get("finetuned_on")
            if done_on != split:
                raise RunError(f"{ck.reference_path(run)}: this run's reference was trained on split {done_on}, not "
                               f"{split}; use a new run directory, or --overwrite to start this one afresh")
        check_or_write_config(cfg, run)
        return _finetune(cfg, run, split, bench, rows)


def _finetune(cfg: RunConfig, run: pathlib.Path, split: str, bench, rows) -> pathlib.Path:
    from jaxunlearn.data import PairedIterator
    from jaxunlearn.train import copy_tree

    method = get_method("finetune")
    tokenizer = load_tokenizer(cfg, bench)
    setup, params, source = initial_params(cfg, tokenizer)
    check_max_len(cfg, setup.model_cfg)
    examples = encode(tokenizer, cfg, rows)
    it = PairedIterator(examples, examples, cfg.train.batch_size, cfg.train.seed, cfg.data.buckets, tokenizer.pad_token_id)
    stage = Stage(name="finetune", subdir=method.stage_dir, objective=build_objective(cfg),
                  batch_at=lambda i: {"train": it.batch_at(i)["forget"]}, micro_steps_per_epoch=it.steps_per_epoch,
                  reference_hash=None, data_tag=f"split {split}")
    # the finetune objective ignores ref_params; a separate copy keeps the donated buffers apart
    state, _ = train_stage(run, cfg, setup, stage, params, copy_tree(params))
    meta = reference_meta(setup, dict(source, finetuned_on=split, steps=state.step), tokenizer)
    if ck.has_reference(run):
        ck.verify_reference(run, state.params)
    else:
        ck.save_reference(run, state.params, meta)
    ck.append_metrics(run, {"stage": "finetune", "event": "reference_written", "hash": ck.reference_hash(run)})
    write_result(run, "finetune", {"model": "reference"})
    return run


def build_objective(cfg: RunConfig):
    """The objective of cfg.method with its hyper-parameters; a value the objective rejects is a ConfigError."""
    from jaxunlearn.objectives import get_objective

    name, kwargs = get_method(cfg.method.name).objective(cfg.method.params)
    try:
        return get_objective(name, **kwargs)
    except JaxunlearnError:
        raise
    except ValueError as e:
        raise ConfigError(f"method ({cfg.method.name}): {' '.join(str(e).split())}") from None


def _batches(cfg: RunConfig, bench, tokenizer, needs: tuple[str, ...]):
    """PairedIterator over the forget/retain (and target) examples, and micro-step -> batch of the method."""
    from jaxunlearn.data import PairedIterator, target_rows

    forget, retain = encode(tokenizer, cfg, bench.forget), encode(tokenizer, cfg, bench.retain)
    target = None
    if "target" in needs or cfg.data.target:
        if not getattr(bench, "idk", None):
            raise RunError(f"method {cfg.method.name!r} needs target answers, but benchmark {bench.name} has none")
        target = encode(tokenizer, cfg, target_rows(bench.forget, bench.idk, cfg.train.seed))
    it = PairedIterator(forget, retain, cfg.train.batch_size, cfg.train.seed, cfg.data.buckets,
                        tokenizer.pad_token_id, target)
    if "train" in needs:  # plain fine-tuning on the forget set (task vector)
        return it, lambda i: {"train": it.batch_at(i)["forget"]}
    return it, it.batch_at


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
    """Train cfg.method from the reference and write its result model (see jaxunlearn.methods).

    reference: a run directory (its result model) or HF folder, or "random" (a random init of
    model.preset); required unless RUN already has a reference or model.hf_folder is set.
    overwrite: start RUN afresh (see start_afresh).
    """
    from jaxunlearn import extrapolate as ex

    cfg, run = resolve_run(cfg, run)
    method = get_method(cfg.method.name)
    if method.name == "finetune":
        raise RunError("method 'finetune' trains a reference: use `jaxunlearn finetune`")
    objective = build_objective(cfg)  # a bad hyper-parameter must fail now, not after training
    ex.get_rule(getattr(cfg.method.params, "rule", "linear"))
    bench = load_benchmark(cfg.data)
    with run_lock(run, "jaxunlearn unlearn"):
        if overwrite:
            start_afresh(run)
        check_reference_source(cfg, run, reference)
        check_or_write_config(cfg, run)
        return _unlearn(cfg, run, reference, bench, objective)


def _unlearn(cfg: RunConfig, run: pathlib.Path, reference: str | None, bench, objective) -> pathlib.Path:
    from jaxunlearn import extrapolate as ex
    from jaxunlearn.train import copy_tree

    method, hp = get_method(cfg.method.name), cfg.method.params
    rule = getattr(hp, "rule", "linear")
    # a rerun (maybe without --reference) keeps the tokenizer recorded with the run's reference
    recorded = ck.read_meta(ck.reference_path(run)).get("tokenizer") if ck.has_reference(run) else None
    tokenizer = load_tokenizer(cfg, bench, recorded or reference_tokenizer_folder(reference))
    setup, ref_params, ref_hash = reference_for(cfg, run, reference, tokenizer)
    check_max_len(cfg, setup.model_cfg)
    if len(tokenizer) > setup.model_cfg.vocab_size:
        raise RunError(f"tokenizer has {len(tokenizer)} tokens but the reference model's vocab_size is "
                       f"{setup.model_cfg.vocab_size}; set data.tokenizer to the reference's tokenizer")
    it, batch_at = _batches(cfg, bench, tokenizer, method.data(hp))
    momentum = None
    if getattr(hp, "momentum", False):
        momentum = functools.partial(ex.momentum_update, alpha=hp.alpha, eta=hp.eta, rule=rule)
    stage = Stage(name=method.name, subdir=method.stage_dir, objective=objective, batch_at=batch_at,
                  micro_steps_per_epoch=it.steps_per_epoch, reference_hash=ref_hash, momentum=momentum,
                  momentum_every=getattr(hp, "momentum_every", 0), trainable=getattr(hp, "trainable", ".*"))
    with ck.MemorizedCheckpoints(run, subdir=method.stage_dir) as mgr:
        fresh = mgr.latest_step() is None
    start = copy_tree(ref_params) if fresh else None  # the trainable copy (donated by the step)
    step_ref = cast_reference(ref_params, cfg.model.reference_dtype)  # after its hash was checked
    cast = step_ref is not ref_params
    del ref_params  # with a cast, the stored-precision reference leaves the devices while training
    state, n_steps = train_stage(run, cfg, setup, stage, start, step_ref)
    if method.result == "trained":
        write_result(run, method.name, {"model": "trained", "step": n_steps})
        return run
    # extrapolation uses the stored reference (hash-verified again), never the cast one
    ref_params = ck.load_reference(run, setup.abstract)[0] if cast else step_ref
    write_forget(run, ref_params, state.params, hp.alpha, n_steps, False, rule)
    eta = None
    if momentum is not None:
        eta = hp.eta
        _write_forget_params(run, state.extras["momentum"], hp.alpha, n_steps, eta, False, rule)
    write_result(run, method.name, {"model": "forget", "alpha": hp.alpha, "eta": eta})
    return run


def continual(cfg: RunConfig, run: str | pathlib.Path | None, stages: list[str], reference: str | None = None,
              overwrite: bool = False) -> list[pathlib.Path]:
    """Unlearn forget splits one after another: stage k (RUN/k-SPLIT) starts from, and uses as its
    reference, the result model of stage k-1 (stage 1: --reference). Each stage is an ordinary,
    resumable `unlearn` run, so rerunning the command skips finished stages' training."""
    cfg, run = resolve_run(cfg, run)
    if not stages:
        raise RunError("continual: give at least one forget split (--stages forget01 forget05 ...)")
    out, previous = [], reference
    for k, split in enumerate(stages, start=1):
        stage_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, forget_split=split))
        sub = run / f"{k}-{split}"
        out.append(unlearn(stage_cfg, sub, previous, overwrite))
        previous = str(sub)
    return out


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


def extrapolate_run(
    run, alphas: list[float] | None = None, step: int | None = None, overwrite: bool = False
) -> list[pathlib.Path]:
    """Write RUN/forget/alpha_A for every alpha (default: the method's alphas, else its alpha) from
    the reference and a trained step (default: the latest). Only for methods that extrapolate."""
    run = pathlib.Path(run)
    alphas = [check_alpha(a, f"--alpha {a}") for a in alphas or []]  # all checked before any is written
    cfg, _ = run_setup(run)
    method, hp = get_method(cfg.method.name), cfg.method.params
    if method.name == "finetune":
        raise RunError(f"{run}: is a finetune run (a reference model): it has no memorised model to extrapolate; "
                       f"run `jaxunlearn unlearn --reference {run} --run NEW_RUN` first")
    if method.result != "extrapolated":
        raise RunError(f"{run}: method {method.name!r} keeps its trained model; it has nothing to extrapolate")
    with run_lock(run, "jaxunlearn extrapolate"):
        setup, ref_params, _ = load_run_params(run, "reference")
        _, mem_params, position = load_run_params(run, "trained", step=step, mesh=setup.mesh)
        if position.get("reference_hash") != ck.reference_hash(run):
            raise ck.HashMismatchError(f"{run}/{method.stage_dir}: trained step was not trained from this run's reference")
        alphas = alphas or list(getattr(hp, "alphas", [hp.alpha]))
        rule = getattr(hp, "rule", "linear")
        return [write_forget(run, ref_params, mem_params, a, position["step"], overwrite, rule) for a in alphas]


def export_run(run, which: str, out, alpha: float | None = None, eta: float | None = None, step: int | None = None):
    """Export a run's parameters (and its tokenizer, when it can be rebuilt) as an HF folder."""
    from jaxunlearn import distributed
    from jaxunlearn.models import hf, merge_params

    run = pathlib.Path(run)
    setup, params, meta = load_run_params(run, which, alpha, eta, step)
    cfg = read_run_config(run)  # the run's settings only: load_run_params already built the model setup
    info = {"run": str(run.absolute()), "which": which, "method": cfg.method.name, "alpha": meta.get("alpha"),
            "eta": meta.get("eta"), "step": meta.get("step", meta.get("source_step")), "data": to_dict(cfg.data)}
    out = pathlib.Path(out)
    host = ck.host_tree(params)  # every process takes part in gathering shards held elsewhere
    if ck.is_primary():
        hf.export_hf(merge_params(setup.graphdef, host), out, info=info)
        run_tokenizer(run).save_pretrained(str(out))
    distributed.barrier("export_hf")
    return out


# ----------------------------------------------------------------------------- CLI


OVERWRITE_HELP = ("start the run directory afresh: delete its config, checkpoints, forget models, result and "
                  "metrics (other files stay), e.g. to rerun a failed or finished run with a changed setting")


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
        raise ConfigError(f"expected key=value overrides after the config file, got {bad}")
    return load_config(path, args)


def finetune_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn finetune", description="train a reference or retain model")
    _config_args(p)
    p.add_argument("--split", default="full", help="benchmark split to train on (full, retain, forget, ...)")
    p.add_argument("--hf-out", help="also export the trained model as an HF folder here")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a = p.parse_intermixed_args(argv)

    run = finetune(_load_cli_config(a.args), a.run, a.split, a.overwrite)
    if a.hf_out:
        export_run(run, "reference", a.hf_out)
    print(f"reference written to {ck.reference_path(run)}")
    return 0


def unlearn_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn unlearn", description="unlearn with method=NAME (default mox)")
    _config_args(p)
    p.add_argument("--reference", help="run directory (its result model) or HF folder of the reference (if RUN has "
                                       "none yet), or 'random' for a random initialisation of model.preset")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a = p.parse_intermixed_args(argv)

    run = unlearn(_load_cli_config(a.args), a.run, a.reference, a.overwrite)
    print(f"result model ({describe_result(run)}) in {run}")
    return 0


def continual_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn continual",
                                description="unlearn forget splits in sequence, each from the previous result model")
    _config_args(p)
    p.add_argument("--stages", nargs="+", required=True, help="forget splits in order, e.g. forget01 forget05 forget10")
    p.add_argument("--reference", help="run directory or HF folder the first stage starts from, or 'random'")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a = p.parse_intermixed_args(argv)

    for sub in continual(_load_cli_config(a.args), a.run, a.stages, a.reference, a.overwrite):
        print(f"{sub.name}: result model ({describe_result(sub)})")
    return 0


def extrapolate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn extrapolate", description="write forget models for given alphas")
    p.add_argument("--run", required=True)
    p.add_argument("--alpha", type=float, nargs="+", help="alphas to write (default: method.alphas of the run)")
    p.add_argument("--step", type=int, help="trained step to use (default: latest)")
    p.add_argument("--overwrite", action="store_true", help="replace existing, different forget models")
    a = p.parse_args(argv)

    for path in extrapolate_run(a.run, a.alpha, a.step, a.overwrite):
        print(path)
    return 0


def export_hf_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn export-hf", description="export run parameters as an HF folder")
    p.add_argument("--run", required=True)
    p.add_argument("--which", choices=WHICH, default="result",
                   help="result (default: the method's result model), forget, trained (memorized), reference")
    p.add_argument("--alpha", type=float, help="forget model's alpha (default: method.alpha of the run)")
    p.add_argument("--eta", type=float, help="momentum forget model's eta")
    p.add_argument("--step", type=int, help="trained step (default: latest)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    print(export_run(a.run, a.which, a.out, a.alpha, a.eta, a.step))
    return 0
