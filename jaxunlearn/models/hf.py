"""Hugging Face checkpoint interop: strict safetensors loading and export that `transformers` loads unchanged.

    model = load_hf("ckpt/")                       # config.json + model.safetensors or a sharded index
    export_hf(model, "out/", max_shard_size="2GB") # config.json + safetensors (+ index when sharded)

Loading is strict: a weight the architecture does not expect, a weight it expects but the files lack, or a
shape that differs is a `CheckpointError` naming the key and file. Two things are tolerated: rotary
`inv_freq` buffers (recomputed from the config) and, for tied embeddings, an `lm_head.weight` equal to the
embedding matrix. Tokenizers live in the same folder: `transformers.AutoTokenizer.from_pretrained(folder)`.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxunlearn.errors import JaxunlearnError
from jaxunlearn.models.config import ModelConfig
from jaxunlearn.models.decoder import CausalLM, DecoderLayer, LayerNorm, ParallelDecoderLayer, RMSNorm, split_params
from jaxunlearn.models.families import Layout, layout_of, register_layout

INDEX_FILE = "model.safetensors.index.json"
EXPORT_MARKER = "jaxunlearn_export.json"  # marks a folder written by export_hf (and what it holds)
SINGLE_FILE = "model.safetensors"


class CheckpointError(JaxunlearnError, ValueError):
    """A checkpoint folder does not match the architecture its config describes."""


# --------------------------------------------------------------------------- name/layout table
# kind: how an HF tensor maps to ours. "copy": same layout; "linear": HF [out, in] -> ours [in, out];
# "split_out": HF [H*D, E] -> ours [E, H, D]; "split_bias": [H*D] -> [H, D]; "split_in": HF [E, H*D] -> [H, D, E].
# Layer weights live in stacked parameters: row (hf_key, path, kind, i) is slice i of the [L, ...] param at path.
# Each decoder layout (models/families.py) has its own table; the built-in ones are registered below.
def weight_table(cfg: ModelConfig) -> list[tuple[str, tuple, str, int | None]]:
    """(hf_key, path in our params, kind, layer index or None) for every weight of cfg's layout, in HF order."""
    return layout_of(cfg).hf_weights(cfg)


def _decoder_weights(cfg: ModelConfig, *, o_proj: str, mlp: tuple[str, ...], norms: tuple[str, ...],
                     final_norm: str, norm_bias: bool) -> list[tuple[str, tuple, str, int | None]]:
    """The weight table of the built-in layouts, which differ in the names given as arguments."""
    rows: list[tuple[str, tuple, str, int | None]] = [
        ("model.embed_tokens.weight", ("embed_tokens", "embedding"), "copy", None)]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", ("layers",)

        def add(hf_name, path, kind):
            rows.append((f"{hf}.{hf_name}", (*ours, *path), kind, i))

        for proj in ("q_proj", "k_proj", "v_proj"):
            add(f"self_attn.{proj}.weight", ("self_attn", proj, "kernel"), "split_out")
            if cfg.qkv_bias:
                add(f"self_attn.{proj}.bias", ("self_attn", proj, "bias"), "split_bias")
        if cfg.qk_layernorm:
            for norm in ("q_layernorm", "k_layernorm"):
                for hf_name, ours_name in (("weight", "scale"), ("bias", "bias")):
                    add(f"self_attn.{norm}.{hf_name}", ("self_attn", norm, ours_name), "copy")
        add(f"self_attn.{o_proj}.weight", ("self_attn", "o_proj", "kernel"), "split_in")
        if cfg.o_bias:
            add(f"self_attn.{o_proj}.bias", ("self_attn", "o_proj", "bias"), "copy")
        for proj in mlp:
            add(f"mlp.{proj}.weight", ("mlp", proj, "kernel"), "linear")
            if cfg.mlp_bias:
                add(f"mlp.{proj}.bias", ("mlp", proj, "bias"), "copy")
        for norm in norms:
            add(f"{norm}.weight", (norm, "scale"), "copy")
            if norm_bias:
                add(f"{norm}.bias", (norm, "bias"), "copy")
    rows.append((f"{final_norm}.weight", ("norm", "scale"), "copy", None))
    if norm_bias:
        rows.append((f"{final_norm}.bias", ("norm", "bias"), "copy", None))
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head", "kernel"), "linear", None))
    if cfg.lm_head_bias:
        rows.append(("lm_head.bias", ("lm_head", "bias"), "copy", None))
    return rows


register_layout(Layout("llama", DecoderLayer, RMSNorm, functools.partial(
    _decoder_weights, o_proj="o_proj", mlp=("gate_proj", "up_proj", "down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"), final_norm="model.norm", norm_bias=False)))
register_layout(Layout("phi", ParallelDecoderLayer, LayerNorm, functools.partial(
    _decoder_weights, o_proj="dense", mlp=("fc1", "fc2"), norms=("input_layernorm",),
    final_norm="model.final_layernorm", norm_bias=True)))


def to_ours(x: np.ndarray, kind: str, our_shape: tuple) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "linear":
        return x.T
    if kind in ("split_out", "split_in"):
        return x.T.reshape(our_shape)
    if kind == "split_bias":
        return x.reshape(our_shape)
    raise AssertionError(kind)


def to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "linear":
        return x.T
    if kind == "split_out":
        return x.reshape(x.shape[0], -1).T
    if kind == "split_in":
        return x.reshape(-1, x.shape[-1]).T
    if kind == "split_bias":
        return x.reshape(-1)
    raise AssertionError(kind)


def hf_shape(our_shape: tuple, kind: str) -> tuple:
    """The HF tensor shape that maps onto a parameter of `our_shape`."""
    if kind == "copy":
        return tuple(our_shape)
    if kind == "linear":
        return tuple(reversed(our_shape))
    if kind == "split_out":
        return (int(np.prod(our_shape[1:])), our_shape[0])
    if kind == "split_in":
        return (our_shape[-1], int(np.prod(our_shape[:-1])))
    if kind == "split_bias":
        return (int(np.prod(our_shape)),)
    raise AssertionError(kind)


def _ignored(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")


# --------------------------------------------------------------------------- reading
def checkpoint_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Map every tensor name to the safetensors file holding it (single file or sharded index)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from None
        files = {name: folder / fname for name, fname in weight_map.items()}
        for name, file in files.items():
            if not file.is_file():
                raise CheckpointError(f"{index}: weight {name!r} points to missing file {file.name}")
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints load)")


def _open(file: pathlib.Path):
    """safe_open, with an unreadable file reported as a CheckpointError naming it."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


def _read(files: dict[str, pathlib.Path], names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for `names`, opening each file once."""
    by_file: dict[pathlib.Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, wanted in by_file.items():
        with _open(file) as f:
            present = set(f.keys())
            for name in wanted:
                if name not in present:
                    raise CheckpointError(f"{file}: index lists weight {name!r} but the file lacks it")
                yield name, f.get_tensor(name)


def load_hf(folder, dtype="float32", param_dtype="float32", config: ModelConfig | None = None,
            shardings=None) -> CausalLM:
    """Load a Hugging Face checkpoint folder (config.json + safetensors) strictly into a CausalLM.

    `dtype` is the compute dtype and `param_dtype` the dtype parameters are stored in (checkpoint tensors
    are converted). `config` overrides the folder's config.json (e.g. to turn on remat). `shardings`
    (optional): a tree like the params holding a jax.sharding.Sharding per parameter; each tensor is then
    placed straight onto its devices instead of the default device.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder does not exist")
    cfg = config or ModelConfig.from_hf_folder(folder)
    files = checkpoint_files(folder)
    table = weight_table(cfg)
    expected = {row[0] for row in table}
    present = {k for k in files if not _ignored(k)}
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in present
    if tied_head:
        present.discard("lm_head.weight")
    missing = sorted(expected - present, key=_natural)
    if missing:
        listing = INDEX_FILE if (folder / INDEX_FILE).is_file() else SINGLE_FILE
        raise CheckpointError(f"{folder}: missing weight {missing[0]!r} (not in {listing})"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(present - expected, key=_natural)
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected weight {unexpected[0]!r} in {files[unexpected[0]].name}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))

    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, param_dtype=param_dtype))
    graphdef, params = split_params(abstract)
    target = jnp.dtype(param_dtype)
    rows = {hf_key: (path, kind, layer) for hf_key, path, kind, layer in table}
    host: dict[tuple, np.ndarray] = {}  # path -> full (stacked) host array, filled slice by slice
    for name, array in _read(files, sorted(expected, key=_natural)):
        path, kind, layer = rows[name]
        shape = _at(params, path).shape
        if path not in host:
            host[path] = np.empty(shape, target)
        our_shape = shape if layer is None else shape[1:]
        want = hf_shape(our_shape, kind)
        if tuple(array.shape) != want:
            raise CheckpointError(f"{files[name]}: weight {name!r} has shape {tuple(array.shape)}, "
                                  f"expected {want}")
        value = to_ours(array, kind, our_shape).astype(target)
        if layer is None:
            host[path] = value
        else:
            host[path][layer] = value
    values = {}
    for path, value in host.items():  # device_put: jnp.asarray compiled a program per weight shape
        sharding = None if shardings is None else _at(shardings, path)
        if isinstance(sharding, nnx.Variable):
            sharding = sharding.get_value()
        values[path] = jax.device_put(value, sharding)
    if tied_head:
        _check_tied(files, values[("embed_tokens", "embedding")], target)
    for path, value in values.items():
        _at(params, path).set_value(value)
    return nnx.merge(graphdef, params)


def _check_tied(files, embedding, target):
    (_, head), = _read(files, ["lm_head.weight"])
    if head.shape != embedding.shape or not np.array_equal(np.asarray(jnp.asarray(head, target)),
                                                           np.asarray(embedding)):
        raise CheckpointError(f"{files['lm_head.weight']}: unexpected weight 'lm_head.weight' "
                              "(config ties embeddings but it differs from embed_tokens)")


def _at(params, path):
    node = params
    for key in path:
        node = node[key]
    return node


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# --------------------------------------------------------------------------- writing
def parse_size(size) -> int:
    """Bytes from an int or a string like "2GB", "500MB", "10KB", "5GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '2GB'")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[m.group(2)])


def hf_state_dict(model_or_params, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """HF-named numpy tensors (HF layouts, the parameters' own dtype) in HF order."""
    if isinstance(model_or_params, nnx.Module):
        cfg = model_or_params.config
        _, params = split_params(model_or_params)
    else:
        params = model_or_params
        if cfg is None:
            raise ValueError("hf_state_dict(params) needs cfg")
    out, host = {}, {}
    for hf_key, path, kind, layer in weight_table(cfg):
        if path not in host:
            host[path] = np.asarray(jax.device_get(_at(params, path)[...]))
        value = host[path] if layer is None else host[path][layer]
        out[hf_key] = np.ascontiguousarray(to_hf(value, kind))
    return out


def _write_export(folder: pathlib.Path, shards: list[dict], tensors: dict, config: dict) -> None:
    """safetensors shard(s), the index when sharded, then config.json, into `folder`."""
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata=meta)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                 "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_hf(model: CausalLM, folder, max_shard_size="2GB", params=None, info: dict | None = None) -> pathlib.Path:
    """Write config.json and safetensors weights (sharded with an index above max_shard_size).

    `params` (optional) replaces the model's own parameters, e.g. an extrapolated pytree.
    `folder` must be new, empty or an earlier export (it holds EXPORT_MARKER, which records
    `info`, e.g. the run and benchmark the weights come from); any other non-empty folder is
    refused, so unrelated files are never overwritten. Files are written with mode 0644.
    """
    folder = pathlib.Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / EXPORT_MARKER).exists():
        raise FileExistsError(f"{folder}: folder is not empty and holds no earlier export ({EXPORT_MARKER}); "
                              "export into a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = hf_state_dict(params if params is not None else model, cfg)
    dtypes = {str(t.dtype) for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"export_hf: parameters have mixed dtypes {sorted(dtypes)}; cast them first")
    limit = parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    # Write into a temporary folder inside `folder` first: a failure leaves an existing export untouched.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=folder))
    try:
        _write_export(tmp, shards, tensors, cfg.to_hf_dict(dtype=dtypes.pop()))
        (tmp / EXPORT_MARKER).write_text(json.dumps(info or {}, indent=2, sort_keys=True) + "\n")
        for stale in list(folder.glob("model*.safetensors")) + [folder / INDEX_FILE]:
            if stale.exists():
                stale.unlink()
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # readable by others, like save_pretrained's files
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
