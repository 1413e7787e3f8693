"""Typed run configuration: dataclasses, YAML loading, `key=value` overrides, saving.

A run is described by one `RunConfig` composed of sections:

  model       ModelSpec       which network (HF folder or named preset) and its dtypes
  data        DataSpec        benchmark, source, forget split, lengths, prompt format
  train       TrainSpec       optimiser, schedule, batch size, accumulation, seed, clipping
  mesh        MeshSpec        device mesh shape (data, fsdp, tensor)
  eval        EvalSpec        what `jaxunlearn eval` computes (generation length, batch, MIA)
  method      MethodSpec      the unlearning method (jaxunlearn.methods) and its hyper-parameters
  checkpoint  CheckpointSpec  how many checkpoints to keep and how often to save

Public functions:
  load_config(path_or_None, overrides) -> RunConfig
  from_dict(d, where="config") -> RunConfig       (strict: unknown keys and wrong types raise)
  apply_overrides(cfg, ["train.lr=1e-4", ...]) -> RunConfig
  to_dict(cfg) -> plain dict (YAML/JSON-safe);  save_yaml(cfg, path)

The method section is `method: NAME` or `method: {name: NAME, KEY: VALUE, ...}`; on the command
line `method=NAME` (switches to NAME with its published defaults) and `method.KEY=VALUE` (give
`method=NAME` first). Its keys are validated against the named method's hyper-parameter dataclass.
The former `mox:` section is refused with a one-line pointer to `method.KEY`.

Every error is a `ConfigError` (a ValueError) whose one-line message names the file or
override and the dotted key that is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from jaxunlearn.errors import JaxunlearnError


class ConfigError(JaxunlearnError, ValueError):
    """A config file or override is malformed: the message names the key and the problem."""


@dataclass(frozen=True)
class ModelSpec:
    """The network to train. `hf_folder` wins over `preset` when both are set."""

    preset: str = "tiny-llama"  # a ModelConfig.preset name, used for random initialisation
    hf_folder: Optional[str] = None  # a Hugging Face folder (config.json + safetensors)
    dtype: str = "float32"  # compute dtype ("float32" | "bfloat16")
    param_dtype: str = "float32"  # storage dtype of the trainable parameters
    init_seed: int = 0  # seed of the random initialisation (preset only)
    # dtype the frozen reference is held in on device during unlearning (None = as the parameters);
    # its hash is checked on the stored checkpoint first; extrapolation uses the stored reference
    reference_dtype: Optional[str] = None
    # run the decoder layers as one jax.lax.scan (false: a Python loop, same numbers; "auto": a loop only in
    # a training step on one CPU device with at most 8 layers, where it is faster)
    scan_layers: Union[bool, str] = "auto"
    remat: str = "none"  # per-layer rematerialisation: none|full|dots|dots_with_no_batch_dims|save_qkv_proj|save_qkv_out_proj
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: xla|cudnn (NVIDIA GPUs)


@dataclass(frozen=True)
class DataSpec:
    """Which benchmark and how to tokenise it."""

    benchmark: str = "synthetic"  # a name in jaxunlearn.data.benchmarks.BENCHMARKS (synthetic | tofu | muse)
    corpus: str = "news"  # MUSE corpus: "news" | "books"
    source: Optional[str] = None  # local folder of data files; None = the hub / built-in generator
    forget_split: str = "forget10"  # TOFU split; synthetic: forget01 | forget05 | forget10 (1, 2, 4 authors)
    max_len: int = 128
    buckets: tuple[int, ...] = (64, 128)  # static padded lengths (sorted, last == max_len; data.bucket_ladder(max_len))
    prompt_format: Optional[str] = None  # None = pick from the tokenizer / model family
    tokenizer: Optional[str] = None  # tokenizer folder; None = the model's folder or the synthetic one
    target: Optional[str] = None  # targeted variant: split with target answers (e.g. "idontknow")
    synthetic_seed: int = 0
    synthetic_entities: int = 20


@dataclass(frozen=True)
class TrainSpec:
    """AdamW with linear warm-up then linear decay to zero (the paper's schedule)."""

    lr: float = 1e-5
    epochs: int = 10
    max_steps: Optional[int] = None  # cap on optimiser steps (None = epochs * steps_per_epoch)
    batch_size: int = 32  # global batch size of one micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0  # warm-up length in epochs (the paper: the first epoch)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: Optional[float] = None  # global gradient-norm clipping; None = off
    seed: int = 0  # data order (and any RNG the objective uses)
    log_every: int = 1
    # sequence positions per chunk of the losses over the vocabulary (objectives/common.per_token):
    # at most one fp32 [batch, loss_chunk, vocab] logits block is alive at a time; 0 = full logits
    loss_chunk: int = 128


@dataclass(frozen=True)
class MeshSpec:
    """Device mesh shape; -1 on one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class MethodSpec:
    """The unlearning method (a key of jaxunlearn.methods.METHODS) and its hyper-parameters."""

    name: str = "mox"
    params: Any = None  # an instance of the method's params dataclass; None = its published defaults

    def __post_init__(self):
        if self.params is None:
            object.__setattr__(self, "params", _method(self.name, "method").params())


@dataclass(frozen=True)
class EvalSpec:
    """What `jaxunlearn eval` computes for a run (its command-line options override these)."""

    max_new_tokens: int = 200  # greedy tokens generated per answer (TOFU ROUGE)
    batch_size: int = 16  # evaluation batch (rounded up to a multiple of the data-parallel shards)
    mia: bool = True  # forget-vs-holdout membership-inference AUCs


@dataclass(frozen=True)
class CheckpointSpec:
    keep: int = 3  # keep the last N memorised checkpoints
    save_every: int = 100  # optimiser steps between saves (a final save always happens)
    async_save: bool = True


@dataclass(frozen=True)
class RunConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    mesh: MeshSpec = field(default_factory=MeshSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    run_dir: Optional[str] = None


# ---------------------------------------------------------------- type checking


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        return "a list"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against annotation `tp`; return it normalised (tuples, floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is MethodSpec:
        return _build_method(value, where)
    if _is_dataclass_type(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


MOX_MOVED = "the mox section is now the method section (method: {name: mox, alpha: ...}; method.KEY=VALUE)"


def _method(name: Any, where: str):
    from jaxunlearn.methods import UnknownMethodError, get_method

    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: expected a method name, got {name!r}")
    try:
        return get_method(name)
    except UnknownMethodError as e:
        raise ConfigError(f"{where}.name: {e}") from None


def _build_method(value: Any, where: str) -> MethodSpec:
    """MethodSpec from a method name or {name: NAME, KEY: VALUE, ...} (keys checked against NAME's params)."""
    if isinstance(value, MethodSpec):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a method name or a mapping with its name and keys, got {value!r}")
    keys = dict(value)
    name = keys.pop("name", MethodSpec.name)
    method = _method(name, where)
    known = _hints(method.params)
    for key in keys:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key for method {name!r} (known: {', '.join(sorted(known)) or 'none'})")
    params = _build(method.params, keys, where)
    method.check(params, where)
    return MethodSpec(name, params)


def _build(cls, data: Any, where: str):
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if cls is RunConfig and key == "mox":
            raise ConfigError(f"{where}.mox: {MOX_MOVED}")
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}.{key}: unknown key (known: {known})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    cfg = cls(**kwargs)
    _validate(cfg, where)
    return cfg


REFERENCE_DTYPES = ("float32", "bfloat16", "float16")


def _validate(cfg, where: str) -> None:
    """Cross-field checks that a type alone cannot express."""
    if isinstance(cfg, ModelSpec) and cfg.reference_dtype not in (None, *REFERENCE_DTYPES):
        raise ConfigError(f"{where}.reference_dtype: expected null or one of {'|'.join(REFERENCE_DTYPES)}, "
                          f"got {cfg.reference_dtype!r}")
    momentum = isinstance(cfg, RunConfig) and getattr(cfg.method.params, "momentum", False)
    if momentum and cfg.model.reference_dtype not in (None, cfg.model.param_dtype):
        raise ConfigError(f"{where}.model.reference_dtype: method.momentum blends the reference into the forget model "
                          f"at full precision; leave reference_dtype null or equal to param_dtype with momentum")
    if isinstance(cfg, ModelSpec):
        from jaxunlearn.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES, SCAN_LAYERS

        for name, known in (("remat", REMAT_POLICIES), ("attention", ATTENTION_IMPLEMENTATIONS),
                            ("scan_layers", SCAN_LAYERS)):
            if getattr(cfg, name) not in known:
                names = ", ".join(str(k).lower() for k in known)
                raise ConfigError(f"{where}.{name}: unknown {name} {getattr(cfg, name)!r} (one of {names})")
    if isinstance(cfg, DataSpec):
        from jaxunlearn.data.benchmarks import BENCHMARKS

        if cfg.benchmark not in BENCHMARKS:
            raise ConfigError(f"{where}.benchmark: expected {'|'.join(BENCHMARKS)}, got {cfg.benchmark!r}")
        if cfg.corpus not in ("news", "books"):
            raise ConfigError(f"{where}.corpus: expected news|books (the MUSE corpus), got {cfg.corpus!r}")
        if not cfg.buckets or list(cfg.buckets) != sorted(cfg.buckets) or cfg.buckets[-1] != cfg.max_len:
            raise ConfigError(f"{where}.buckets: must be increasing and end at max_len={cfg.max_len}, got {list(cfg.buckets)}")
    if isinstance(cfg, TrainSpec):
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(cfg, name)}")
        if cfg.lr < 0 or cfg.weight_decay < 0 or cfg.warmup_epochs < 0:
            raise ConfigError(f"{where}: lr, weight_decay and warmup_epochs must be >= 0")
        if cfg.max_steps is not None and cfg.max_steps < 1:
            raise ConfigError(f"{where}.max_steps: must be >= 1, got {cfg.max_steps}")
        if cfg.loss_chunk < 0:
            raise ConfigError(f"{where}.loss_chunk: must be >= 0 (0 = no chunking), got {cfg.loss_chunk}")
    if isinstance(cfg, MeshSpec):
        for name in ("data", "fsdp", "tensor"):
            v = getattr(cfg, name)
            if v == 0 or v < -1:
                raise ConfigError(f"{where}.{name}: must be a positive size or -1, got {v}")
        if [cfg.data, cfg.fsdp, cfg.tensor].count(-1) > 1:
            raise ConfigError(f"{where}: at most one mesh axis may be -1")
    if isinstance(cfg, EvalSpec) and (cfg.max_new_tokens < 1 or cfg.batch_size < 1):
        raise ConfigError(f"{where}: max_new_tokens and batch_size must be >= 1")
    if isinstance(cfg, CheckpointSpec):
        if cfg.keep < 1 or cfg.save_every < 1:
            raise ConfigError(f"{where}: keep and save_every must be >= 1")


def check_alpha(alpha: Any, where: str = "alpha") -> float:
    """`alpha` as a float if it is a finite number > 0, else a ConfigError naming `where`."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a finite number > 0, got {alpha!r}") from None
    if isinstance(alpha, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: extrapolation strength must be a finite number > 0, got {alpha!r}")
    return value


# ---------------------------------------------------------------- public API


def from_dict(data: dict | None, where: str = "config") -> RunConfig:
    """Build a RunConfig from nested plain data (missing keys take their defaults)."""
    return _build(RunConfig, data, where)


def to_dict(cfg) -> dict:
    """Plain nested dict (lists instead of tuples) of a config dataclass."""

    def plain(v):
        if isinstance(v, MethodSpec):
            return {"name": v.name, **plain(v.params)}
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split "a.b=value" into (["a", "b"], parsed value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Return a copy of `cfg` with each "dotted.key=value" applied, type-checked."""
    data = to_dict(cfg)
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "mox":
            raise ConfigError(f"override {text!r}: {MOX_MOVED}; here: method.{'.'.join(path[1:])}")
        if path[0] == "method" and len(path) > 1:
            _override_method(data, path, value, text)
            continue
        node, cls = data, RunConfig
        for i, part in enumerate(path):
            hints = _hints(cls)
            dotted = ".".join(path[: i + 1])
            if part not in hints:
                known = ", ".join(sorted(hints))
                raise ConfigError(f"override {text!r}: unknown key {dotted!r} (known here: {known})")
            if i == len(path) - 1:
                try:
                    node[part] = to_dict(_coerce(value, hints[part], dotted))
                except ConfigError as e:
                    raise ConfigError(f"override {text!r}: {e}") from None
            else:
                if not _is_dataclass_type(hints[part]):
                    raise ConfigError(f"override {text!r}: {dotted!r} is not a section")
                node, cls = node[part], hints[part]
    try:
        return from_dict(data, where="config")
    except ConfigError as e:
        raise ConfigError(f"after overrides {list(overrides)}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {line})", line)
            seen[key] = line
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


def _override_method(data: dict, path: list[str], value: Any, text: str) -> None:
    """method.KEY=VALUE: set one key (validated with the whole section later); method.name=N resets to N's defaults."""
    if len(path) != 2:
        raise ConfigError(f"override {text!r}: method keys are one level deep (method.KEY=VALUE)")
    if path[1] == "name":
        data["method"] = to_dict(_build_method(value if isinstance(value, str) else {"name": value}, "method"))
    else:
        data["method"][path[1]] = value


def read_yaml(path: pathlib.Path, error: type[Exception] = ConfigError) -> Any:
    """Parse a YAML file; a syntax error or a duplicate key raises `error` in one line naming the
    file and the position."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        raise error(f"{path}:{e.line}: {e}; remove one of them") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or start from defaults when `path` is None) and apply overrides."""
    if path is None:
        cfg = RunConfig()
    else:
        p = pathlib.Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        cfg = from_dict(read_yaml(p), where=str(p))
    return apply_overrides(cfg, overrides)


def save_yaml(cfg, path: str | pathlib.Path) -> None:
    """Write the resolved config as YAML (readable back with load_config)."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
