"""The run directory: its config, reference model and tokenizer, and loading what a run wrote.

A run directory is laid out as in `jaxunlearn.checkpoint` (config.yaml, reference/, the training
stage's checkpoints, forget/, metrics.jsonl). This module resolves and validates it and builds what
every command needs from it: the benchmark (`load_benchmark`), the tokenizer (`load_tokenizer`,
`run_tokenizer`), the model setup on a mesh (`run_setup`), and any model a run holds
(`load_run_params`). It does not train: evaluation and export depend on it, never on training code.

A rerun whose resolved config differs from RUN/config.yaml is refused, except in keys that do not
change the result (checkpointing, logging, run_dir; see RESULT_NEUTRAL_KEYS).
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import Any, Callable

import jax

from jaxunlearn import checkpoint as ck
from jaxunlearn.config import ConfigError, RunConfig, from_dict, to_dict
from jaxunlearn.errors import JaxunlearnError, RunError

RANDOM_REFERENCE = "random"  # --reference random: start from a random initialisation of model.preset

# config keys a rerun may change: they do not affect the parameters a run produces
RESULT_NEUTRAL_KEYS = ("run_dir", "checkpoint.", "train.log_every", "eval.")

# RUN/result.json names the run's result model once training (and extrapolation) finished
RESULT_FILE = "result.json"
# models of a run that load_run_params / eval / export-hf can load ("memorized" = "trained")
WHICH = ("result", "forget", "trained", "memorized", "reference")

class RunConfigMismatchError(JaxunlearnError, ValueError):
    """A rerun's config differs from the one the run directory was started with."""


# ----------------------------------------------------------------------------- building blocks


def load_benchmark(data_spec, purpose: str = "train"):
    """The benchmark a DataSpec names (jaxunlearn.data.benchmarks), loaded for `purpose` ("train" or "eval")."""
    from jaxunlearn.data import benchmarks

    return benchmarks.load(data_spec, purpose)


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

        from jaxunlearn.data.benchmarks import get_benchmark

        spec = get_benchmark(cfg.data.benchmark).tokenizer_spec(cfg.data)
        if spec != cfg.data:  # e.g. synthetic: one tokenizer for every forget split
            bench = load_benchmark(spec)
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
    cfg = read_run_config(run)
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
    from jaxunlearn.ops import IGNORE

    if rows and isinstance(rows[0], str):
        return encode_texts(tokenizer, rows, cfg.data.max_len)
    fmt = prompt_format_for(tokenizer, cfg.data.prompt_format)
    with warnings.catch_warnings(record=True) as truncation:  # shown below unless refused
        warnings.simplefilter("always")
        examples = encode_rows(tokenizer, fmt, rows, cfg.data.max_len)
    lost = sum(all(t == IGNORE for t in ex["labels"]) for ex in examples)
    if lost:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = encode_rows(tokenizer, fmt, rows, 1 << 30)
        need_one = max(len(ex["labels"]) - sum(t != IGNORE for t in ex["labels"]) + 1 for ex in full)
        need_all = max(len(ex["input_ids"]) for ex in full)
        raise ConfigError(
            f"data.max_len={cfg.data.max_len}: {lost} of {len(examples)} answers would be cut entirely (no answer "
            f"token to train on); set data.max_len (and data.buckets) to at least {need_one} "
            f"({need_all} keeps every answer whole)"
        )
    for w in truncation:
        warnings.warn(w.message, w.category, stacklevel=2)
    return examples


def check_max_len(cfg: RunConfig, model_cfg) -> None:
    """data.max_len must fit the model's position limit (else the run fails late, e.g. out of memory)."""
    limit = model_cfg.max_position_embeddings
    if cfg.data.max_len > limit:
        raise ConfigError(f"data.max_len={cfg.data.max_len} exceeds the model's max_position_embeddings={limit}; "
                          f"set data.max_len (and data.buckets) to at most {limit}")


# ----------------------------------------------------------------------------- run directory


def read_run_config(run: str | pathlib.Path) -> RunConfig:
    """RUN/config.yaml as a RunConfig. A config written before the method section existed (a `mox:`
    section and `method: NAME`) is read as method {name: mox, <the mox keys>} or {name: NAME}."""
    run = pathlib.Path(run)
    data = ck.read_config(run)
    if isinstance(data, dict) and "mox" in data:
        mox, name = data.pop("mox") or {}, data.get("method", "mox")
        data["method"] = {"name": "mox", **mox} if name == "mox" else {"name": name}
    return from_dict(data, where=str(run / ck.CONFIG_FILE))


def resolve_run(cfg: RunConfig, run: str | None) -> tuple[RunConfig, pathlib.Path]:
    run = run or cfg.run_dir
    if not run:
        raise RunError("no run directory: pass --run DIR or set run_dir in the config")
    return dataclasses.replace(cfg, run_dir=str(run)), pathlib.Path(run)


def check_or_write_config(cfg: RunConfig, run: pathlib.Path) -> None:
    """Write RUN/config.yaml, or check that a rerun uses the same resolved config."""
    new = to_dict(cfg)
    if (run / ck.CONFIG_FILE).exists():
        old = to_dict(read_run_config(run))
        diff = sorted(k for k in _diff_keys(old, new) if not k.startswith(RESULT_NEUTRAL_KEYS))
        if diff:
            raise RunConfigMismatchError(
                f"{run / ck.CONFIG_FILE}: this command's config differs at {', '.join(diff)}; "
                "rerun with the original settings, use a new run directory, or pass --overwrite to start this one afresh"
            )
    else:
        run.mkdir(parents=True, exist_ok=True)
        ck.write_config(run, new)
    from jaxunlearn import distributed

    distributed.require_shared(run / ck.CONFIG_FILE)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.add(f"{prefix}{k}")
    return out

def reference_tokenizer_folder(reference: str | None) -> str | None:
    """The tokenizer folder implied by --reference: an HF folder itself, or that of the run's config."""
    if reference is None:
        return None
    path = pathlib.Path(reference)
    if ck.has_reference(path) and (path / ck.CONFIG_FILE).exists():
        ref_cfg = read_run_config(path)
        recorded = ck.read_meta(ck.reference_path(path)).get("tokenizer")
        return ref_cfg.data.tokenizer or ref_cfg.model.hf_folder or recorded
    if (path / "config.json").exists() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        return str(path)
    return None


def check_reference_source(cfg: RunConfig, run: pathlib.Path, reference: str | None) -> None:
    """Unlearning needs a named reference: RUN/reference, --reference, model.hf_folder or --reference random."""
    if reference is None and not ck.has_reference(run) and not cfg.model.hf_folder:
        raise RunError(
            "unlearn needs a model to unlearn from: pass --reference RUN_DIR (a finetuned run) or an HF folder, "
            f"set model.hf_folder, or pass --reference {RANDOM_REFERENCE} to start from a random "
            f"{cfg.model.preset} (pipeline tests only)"
        )


def reference_for(cfg: RunConfig, run: pathlib.Path, reference: str | None, tokenizer) -> tuple[ModelSetup, Any, str]:
    """(setup, reference params, hash) for an unlearning run; writes RUN/reference the first time."""
    check_reference_source(cfg, run, reference)
    given = None
    if reference is not None and reference != RANDOM_REFERENCE:
        ref_path = pathlib.Path(reference)
        if ck.has_reference(ref_path):  # a run directory: its result model (a finetune run's is its reference)
            meta = ck.read_meta(ck.reference_path(ref_path))
            setup = setup_from_meta(meta, cfg, ck.reference_path(ref_path))
            ref_cfg = read_run_config(ref_path)
            which = "result" if (ref_path / RESULT_FILE).exists() else "reference"
            params, _ = load_params(ref_path, ref_cfg, setup, which)
            given = (setup, params, {"run": str(ref_path), "model": describe_result(ref_path) if which == "result" else which})
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

def run_setup(run: pathlib.Path, mesh=None) -> tuple[RunConfig, ModelSetup]:
    """The run's config and model setup (from RUN/config.yaml and RUN/reference/meta.json)."""
    ck.require_run(run)
    cfg = read_run_config(run)
    if not ck.has_reference(run):
        raise ck.RunNotFoundError(f"{ck.reference_path(run)}: run has no complete reference checkpoint")
    setup = setup_from_meta(ck.read_meta(ck.reference_path(run)), cfg, ck.reference_path(run), mesh)
    return cfg, setup


def write_result(run: pathlib.Path, method: str, model: dict) -> None:
    """Record the run's result model: {"model": "trained", "step": S} | {"model": "forget", "alpha": A, "eta": E}
    | {"model": "reference"}."""
    ck.write_json(run / RESULT_FILE, {"method": method, **model})


def read_result(run: pathlib.Path) -> dict:
    path = pathlib.Path(run) / RESULT_FILE
    if not path.exists():
        raise ck.RunNotFoundError(f"{path}: the run has no result model yet (rerun its command to finish it)")
    return ck.read_json(path)


def describe_result(run: pathlib.Path) -> str:
    r = read_result(run)
    if r["model"] == "forget":
        return ck.forget_name(float(r["alpha"]), r.get("eta"))
    return f"trained, step {r['step']}" if r["model"] == "trained" else r["model"]


def load_params(run: pathlib.Path, cfg: RunConfig, setup: ModelSetup, which: str, alpha: float | None = None,
                eta: float | None = None, step: int | None = None) -> tuple[Any, dict]:
    """(params, info) of model `which` (see WHICH) of a run whose config is cfg, placed as in setup."""
    from jaxunlearn.methods import get_method

    method = get_method(cfg.method.name)
    if which == "result":
        r = read_result(run)
        which, alpha, eta, step = r["model"], r.get("alpha"), r.get("eta"), r.get("step")
    if which == "reference":
        return ck.load_reference(run, setup.abstract)
    if which in ("trained", "memorized"):
        mgr = ck.MemorizedCheckpoints(run, subdir=method.stage_dir)
        try:
            got = mgr.restore(setup.abstract, step=step)
        finally:
            mgr.close()
        return got["params"], got["position"]
    if which == "forget":
        if alpha is None and method.result != "extrapolated":
            raise RunError(f"{run}: method {method.name!r} writes no forget models (its result is the trained model)")
        alpha = cfg.method.params.alpha if alpha is None else alpha
        return ck.load_forget(run, alpha, setup.abstract, eta=eta)
    raise RunError(f"--which {which!r}: expected one of {', '.join(WHICH)}")


def load_run_params(
    run, which: str, alpha: float | None = None, eta: float | None = None, step: int | None = None, mesh=None
) -> tuple[ModelSetup, Any, dict]:
    """(setup, params, info) for a model of a run (see WHICH; "result" = the method's result model), hash-verified."""
    run = pathlib.Path(run)
    cfg, setup = run_setup(run, mesh)
    params, info = load_params(run, cfg, setup, which, alpha, eta, step)
    return setup, params, info
