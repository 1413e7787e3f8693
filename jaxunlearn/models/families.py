"""Model families: which Hugging Face `model_type`s load, and what is particular to each.

A family is one registry entry: its HF `model_type` and architecture class name, the decoder
layout it runs on (`arch`: "llama" = pre-norm RMSNorm + SwiGLU; "phi" = parallel block with
LayerNorm; see models/decoder.py and the weight table in models/hf.py), its defaults for keys a
config.json may leave out, and `options`, which reads the family's own keys (biases, sliding
windows, norms) from a config.json dict into ModelConfig fields. ModelConfig.from_hf_dict does
the part every family shares (sizes, heads, rope) and asks the family for the rest.

Adding a model type that runs on an existing layout is one `register_family(Family(...))` here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    hf_architecture: str  # config.json "architectures"[0] written on export
    arch: str  # decoder layout: "llama" | "phi"
    options: Callable[[dict, int], dict[str, Any]]  # (config.json dict, num_layers) -> ModelConfig fields
    hidden_act: str = "silu"  # when config.json has no hidden_act
    partial_rotary_factor: float = 1.0  # when config.json has none


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.model_type in FAMILIES:
        raise ValueError(f"model family {family.model_type!r} is registered twice")
    FAMILIES[family.model_type] = family
    return family


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


register_family(Family("llama", "LlamaForCausalLM", "llama", _llama_options))
register_family(Family("mistral", "MistralForCausalLM", "llama", _mistral_options))
register_family(Family("qwen2", "Qwen2ForCausalLM", "llama", _qwen2_options))
register_family(Family("phi", "PhiForCausalLM", "phi", _phi_options, hidden_act="gelu_new", partial_rotary_factor=0.5))


def model_types(arch: str | None = None) -> tuple[str, ...]:
    """Registered model types (those running on `arch` when given)."""
    return tuple(t for t, f in FAMILIES.items() if arch is None or f.arch == arch)
