"""The training commands: finetune, unlearn (any method), continual, extrapolate, export-hf.

    jaxunlearn finetune [CONFIG.yaml] [key=value ...] --run DIR [--split full] [--hf-out DIR]
    jaxunlearn unlearn  [CONFIG.yaml] [method=NAME method.KEY=V ...] --run DIR [--reference PATH] [--overwrite]
    jaxunlearn continual [CONFIG.yaml] [key=value ...] --run DIR --stages forget01 forget05 forget10 [--reference PATH]
    jaxunlearn extrapolate --run DIR [--alpha A [A ...]] [--step S] [--overwrite]
    jaxunlearn export-hf --run DIR [--which result|forget|trained|reference] [--alpha A] [--eta E] [--step S] --out DIR

A run directory is laid out as in `jaxunlearn.checkpoint`. `finetune` trains a model on a
benchmark split (from an HF folder, `model.hf_folder`, or a random initialisation of
`model.preset`), checkpointing to RUN/finetune/, and writes the result as RUN/reference, so its
run directory (or the HF folder of --hf-out) is the reference of a later `unlearn`.
`unlearn` takes its reference from, in order: RUN/reference if present, --reference (a run
directory, meaning its result model, or an HF folder), `model.hf_folder`, or a random
initialisation of `model.preset`; it trains the method's objective (jaxunlearn.methods) in the
method's stage folder and then, for MOX and task vector, writes the forget model for
`method.alpha` (and the momentum forget model when `method.momentum`). RUN/result.json then names
the result model. `continual` runs `unlearn` once per forget split, each stage in RUN/K-SPLIT
starting from the previous stage's result model.

Resume: rerunning the same command continues from the latest complete checkpoint (params,
optimiser state, RNG key, data position and, with momentum, the running forget model), so the
result is bitwise equal to an uninterrupted run. A rerun whose resolved config differs from
RUN/config.yaml is refused, except in keys that do not change the result (checkpointing,
logging, run_dir; see RESULT_NEUTRAL_KEYS).

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

from jaxunlearn import checkpoint as ck
from jaxunlearn.config import ConfigError, MethodSpec, RunConfig, load_config
from jaxunlearn.errors import JaxunlearnError, RunError
from jaxunlearn.methods import get_method
from jaxunlearn.rundir import (check_or_write_config, encode, initial_params, load_benchmark, load_run_params,
                               load_tokenizer, reference_for, reference_meta, reference_tokenizer_folder, resolve_run,
                               run_setup, run_tokenizer, write_result)
from jaxunlearn.rundir import WHICH, describe_result
from jaxunlearn.stage import Stage, train_stage

# ----------------------------------------------------------------------------- commands (Python API)


def finetune(cfg: RunConfig, run: str | pathlib.Path | None = None, split: str = "full") -> pathlib.Path:
    """Fine-tune cfg.model on benchmark split `split`; RUN/reference holds the result."""
    from jaxunlearn.data import PairedIterator
    from jaxunlearn.train import copy_tree

    cfg, run = resolve_run(dataclasses.replace(cfg, method=MethodSpec("finetune")), run)
    method = get_method("finetune")
    bench = load_benchmark(cfg.data)
    rows = getattr(bench, split, None)
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], (dict, str)):
        raise RunError(f"--split {split!r}: not a non-empty split of benchmark {bench.name}")
    check_or_write_config(cfg, run)
    tokenizer = load_tokenizer(cfg, bench)
    setup, params, source = initial_params(cfg, tokenizer)
    examples = encode(tokenizer, cfg, rows)
    it = PairedIterator(examples, examples, cfg.train.batch_size, cfg.train.seed, cfg.data.buckets, tokenizer.pad_token_id)
    stage = Stage(name="finetune", subdir=method.stage_dir, objective=build_objective(cfg),
                  batch_at=lambda i: {"train": it.batch_at(i)["forget"]}, micro_steps_per_epoch=it.steps_per_epoch,
                  reference_hash=None)
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


def unlearn(
    cfg: RunConfig, run: str | pathlib.Path | None = None, reference: str | None = None, overwrite: bool = False
) -> pathlib.Path:
    """Train cfg.method from the reference and write its result model (see jaxunlearn.methods)."""
    from jaxunlearn import extrapolate as ex
    from jaxunlearn.train import copy_tree

    cfg, run = resolve_run(cfg, run)
    method, hp = get_method(cfg.method.name), cfg.method.params
    if method.name == "finetune":
        raise RunError("method 'finetune' trains a reference: use `jaxunlearn finetune`")
    objective = build_objective(cfg)  # a bad hyper-parameter must fail now, not after training
    rule = getattr(hp, "rule", "linear")
    ex.get_rule(rule)
    check_or_write_config(cfg, run)
    bench = load_benchmark(cfg.data)
    # a rerun (maybe without --reference) keeps the tokenizer recorded with the run's reference
    recorded = ck.read_meta(ck.reference_path(run)).get("tokenizer") if ck.has_reference(run) else None
    tokenizer = load_tokenizer(cfg, bench, recorded or reference_tokenizer_folder(reference))
    setup, ref_params, ref_hash = reference_for(cfg, run, reference, tokenizer)
    if len(tokenizer) > setup.model_cfg.vocab_size:
        raise RunError(f"tokenizer has {len(tokenizer)} tokens but the reference model's vocab_size is "
                       f"{setup.model_cfg.vocab_size}; set data.tokenizer to the reference's tokenizer")
    it, batch_at = _batches(cfg, bench, tokenizer, method.data(hp))
    momentum = None
    if getattr(hp, "momentum", False):
        momentum = functools.partial(ex.momentum_update, alpha=hp.alpha, eta=hp.eta, rule=rule)
    stage = Stage(name=method.name, subdir=method.stage_dir, objective=objective, batch_at=batch_at,
                  micro_steps_per_epoch=it.steps_per_epoch, reference_hash=ref_hash, momentum=momentum,
                  momentum_every=getattr(hp, "momentum_every", 0))
    with ck.MemorizedCheckpoints(run, subdir=method.stage_dir) as mgr:
        fresh = mgr.latest_step() is None
    start = copy_tree(ref_params) if fresh else None  # the trainable copy (donated by the step)
    state, n_steps = train_stage(run, cfg, setup, stage, start, ref_params)
    if method.result == "trained":
        write_result(run, method.name, {"model": "trained", "step": n_steps})
        return run
    write_forget(run, ref_params, state.params, hp.alpha, n_steps, overwrite, rule)
    eta = None
    if momentum is not None:
        eta = hp.eta
        _write_forget_params(run, state.extras["momentum"], hp.alpha, n_steps, eta, overwrite, rule)
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
    cfg, _ = run_setup(run)
    method, hp = get_method(cfg.method.name), cfg.method.params
    if method.result != "extrapolated":
        raise RunError(f"{run}: method {method.name!r} keeps its trained model; it has nothing to extrapolate")
    setup, ref_params, _ = load_run_params(run, "reference")
    _, mem_params, position = load_run_params(run, "trained", step=step, mesh=setup.mesh)
    if position.get("reference_hash") != ck.reference_hash(run):
        raise ck.HashMismatchError(f"{run}/{method.stage_dir}: trained step was not trained from this run's reference")
    alphas = alphas or list(getattr(hp, "alphas", [hp.alpha]))
    rule = getattr(hp, "rule", "linear")
    return [write_forget(run, ref_params, mem_params, a, position["step"], overwrite, rule) for a in alphas]


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
        raise ConfigError(f"expected key=value overrides after the config file, got {bad}")
    return load_config(path, args)


def finetune_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn finetune", description="train a reference or retain model")
    _config_args(p)
    p.add_argument("--split", default="full", help="benchmark split to train on (full, retain, forget, ...)")
    p.add_argument("--hf-out", help="also export the trained model as an HF folder here")
    a = p.parse_args(argv)

    run = finetune(_load_cli_config(a.args), a.run, a.split)
    if a.hf_out:
        export_run(run, "reference", a.hf_out)
    print(f"reference written to {ck.reference_path(run)}")
    return 0


def unlearn_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn unlearn", description="unlearn with method=NAME (default mox)")
    _config_args(p)
    p.add_argument("--reference", help="run directory (its result model) or HF folder of the reference (if RUN has none yet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different forget checkpoint")
    a = p.parse_args(argv)

    run = unlearn(_load_cli_config(a.args), a.run, a.reference, a.overwrite)
    print(f"result model ({describe_result(run)}) in {run}")
    return 0


def continual_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn continual",
                                description="unlearn forget splits in sequence, each from the previous result model")
    _config_args(p)
    p.add_argument("--stages", nargs="+", required=True, help="forget splits in order, e.g. forget01 forget05 forget10")
    p.add_argument("--reference", help="run directory or HF folder the first stage starts from")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different forget checkpoint")
    a = p.parse_args(argv)

    for sub in continual(_load_cli_config(a.args), a.run, a.stages, a.reference, a.overwrite):
        print(f"{sub.name}: result model ({describe_result(sub)})")
    return 0


def extrapolate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn extrapolate", description="write forget models for given alphas")
    p.add_argument("--run", required=True)
    p.add_argument("--alpha", type=float, nargs="+", help="alphas to write (default: method.alphas of the run)")
    p.add_argument("--step", type=int, help="trained step to use (default: latest)")
    p.add_argument("--overwrite", action="store_true")
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
