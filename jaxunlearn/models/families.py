"""Model families and decoder layouts: which Hugging Face `model_type`s load, and what is particular to each.

A layout (`Layout`, registered in LAYOUTS under its name, which a ModelConfig carries as `arch`) is
one decoder architecture: the class of one decoder layer (`block`), the final norm, and the HF
weight-name table (HF tensor name <-> our parameter path, with the transpose/split that maps one
onto the other; the kinds are listed in models/hf.py). The built-in layouts are "llama" (pre-norm
RMSNorm + SwiGLU) and "phi" (parallel block with LayerNorm); their layer classes are in
models/decoder.py and they are registered, with their weight names, in models/hf.py.

A family (`Family`, registered in FAMILIES under its HF `model_type`) is one model type on a
layout: its HF architecture class name, its defaults for keys a config.json may leave out, and
its own config.json keys (biases, sliding windows, norms): `options` reads them into ModelConfig
fields, `hf_keys` writes them back on export (and raises ModelConfigError for a configuration
the family cannot express). ModelConfig.from_hf_dict / to_hf_dict do the part every family
shares (sizes, heads, rope) and ask the family for the rest.

Adding a model type on an existing layout is one `register_family(Family(...))`. Adding a new
layout is one module holding its layer class, its weight table, `register_layout(Layout(...))`
and its family (tests/test_models_families.py does this for a toy layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxunlearn.errors import JaxunlearnError
from jaxunlearn.registry import Registry


class ModelConfigError(JaxunlearnError, ValueError):
    """A model configuration is malformed or uses something this package does not implement."""


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str  # ModelConfig.arch
    # (cfg, *, rng, dtype, param_dtype) -> one decoder layer, an nnx.Module called as
    # layer(x, cos, sin, query_slots, kv_mask, window, cache, cache_index) -> (x, cache)
    block: Callable
    norm: Callable  # (size, eps, *, dtype, param_dtype) -> the final norm (and the layers' norms, if they ask)
    # cfg -> [(hf_key, path in our params, kind, layer index or None)] for every weight, in HF order
    hf_weights: Callable[[Any], list[tuple[str, tuple, str, int | None]]]


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    hf_architecture: str  # config.json "architectures"[0] written on export
    arch: str  # name of its Layout
    options: Callable[[dict, int], dict[str, Any]]  # (config.json dict, num_layers) -> ModelConfig fields
    hf_keys: Callable[[Any], dict[str, Any]]  # ModelConfig -> the family's own config.json keys
    hidden_act: str = "silu"  # when config.json has no hidden_act
    partial_rotary_factor: float = 1.0  # when config.json has none


LAYOUTS = Registry("decoder layout", ModelConfigError)
FAMILIES = Registry("model family", ModelConfigError)


def register_layout(layout: Layout) -> Layout:
    return LAYOUTS.add(layout.name, layout)


def register_family(family: Family) -> Family:
    return FAMILIES.add(family.model_type, family)


def layout_of(cfg) -> Layout:
    """The registered layout a ModelConfig runs on."""
    if cfg.arch not in LAYOUTS:
        raise ModelConfigError(f"arch {cfg.arch!r} is not a registered decoder layout (one of {sorted(LAYOUTS)})")
    return LAYOUTS[cfg.arch]


# --------------------------------------------------------------------------- the built-in families
def _llama_options(d: dict, num_layers: int) -> dict[str, Any]:
    bias = bool(d.get("attention_bias", False))
    return dict(norm_eps=float(d.get("rms_norm_eps", 1e-6)), qkv_bias=bias, o_bias=bias,
                mlp_bias=bool(d.get("mlp_bias", False)))


def _mistral_options(d: dict, num_layers: int) -> dict[str, Any]:
    window = d.get("sliding_window")
    return dict(_llama_options(d, num_layers), sliding_window=int(window) if window else None)


def _qwen2_options(d: dict, num_layers: int) -> dict[str, Any]:
    out = dict(_llama_options(d, num_layers), qkv_bias=True, o_bias=False)
    if d.get("use_sliding_window") and d.get("sliding_window"):
        layer_types = d.get("layer_types") or [
            "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention" for i in range(num_layers)]
        out.update(sliding_window=int(d["sliding_window"]), layer_types=tuple(layer_types))
    return out


def _phi_options(d: dict, num_layers: int) -> dict[str, Any]:
    return dict(norm_eps=float(d.get("layer_norm_eps", 1e-5)), qkv_bias=True, o_bias=True, mlp_bias=True,
                lm_head_bias=True, qk_layernorm=bool(d.get("qk_layernorm", False)))


def _llama_layout_keys(cfg) -> dict[str, Any]:
    """Keys every family on the "llama" layout writes."""
    if cfg.partial_rotary_factor != 1.0:
        raise ModelConfigError(f"{cfg.model_type} has no partial rotary; partial_rotary_factor must be 1")
    if cfg.qk_layernorm:
        raise ModelConfigError(f"{cfg.model_type} has no qk_layernorm; use model_type 'phi'")
    return dict(rms_norm_eps=cfg.norm_eps, head_dim=cfg.head_dim)


def _llama_keys(cfg) -> dict[str, Any]:
    if cfg.qkv_bias != cfg.o_bias:
        raise ModelConfigError("llama's attention_bias covers q/k/v and o together; use qwen2 for q/k/v-only")
    return dict(_llama_layout_keys(cfg), attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)


def _mistral_keys(cfg) -> dict[str, Any]:
    if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        raise ModelConfigError("mistral has no attention/MLP biases; use model_type 'llama' with attention_bias")
    return dict(_llama_layout_keys(cfg), sliding_window=cfg.sliding_window)


def _qwen2_keys(cfg) -> dict[str, Any]:
    if cfg.qkv_bias is False:
        raise ModelConfigError("qwen2 always has q/k/v biases; use model_type 'llama' for a bias-free model")
    layer_types = cfg.layer_types or ["sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.num_layers
    return dict(_llama_layout_keys(cfg), use_sliding_window=bool(cfg.sliding_window),
                sliding_window=cfg.sliding_window, max_window_layers=cfg.num_layers, layer_types=list(layer_types))


def _phi_keys(cfg) -> dict[str, Any]:
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ModelConfigError("phi needs head_dim * num_heads == hidden_size")
    return dict(layer_norm_eps=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, qk_layernorm=cfg.qk_layernorm,
                partial_rotary_factor=cfg.partial_rotary_factor)


register_family(Family("llama", "LlamaForCausalLM", "llama", _llama_options, _llama_keys))
register_family(Family("mistral", "MistralForCausalLM", "llama", _mistral_options, _mistral_keys))
register_family(Family("qwen2", "Qwen2ForCausalLM", "llama", _qwen2_options, _qwen2_keys))
register_family(Family("phi", "PhiForCausalLM", "phi", _phi_options, _phi_keys, hidden_act="gelu_new",
                       partial_rotary_factor=0.5))


def model_types(arch: str | None = None) -> tuple[str, ...]:
    """Registered model types (those running on `arch` when given)."""
    return tuple(t for t, f in FAMILIES.items() if arch is None or f.arch == arch)
