"""Model configuration: one frozen dataclass for every supported decoder, with HF config.json conversion.

Supported Hugging Face `model_type`s (the registry in models/families.py; `arch` names the decoder layout): "llama", "mistral", "qwen2" (all `arch="llama"`: pre-norm RMSNorm,
SwiGLU MLP, rotary attention, optional grouped-query heads) and "phi" (`arch="phi"`: Phi-1/1.5/2 with
LayerNorm, parallel attention + MLP, partial rotary, biases everywhere, optional qk_layernorm). Grouped-query
attention, tied or untied embeddings, explicit `head_dim`, Llama `attention_bias`/`mlp_bias` and Qwen2's
q/k/v-only biases are all covered.

Rope scaling types: "default", "linear", "dynamic" (NTK, recomputed from the largest position in each call,
which is what a freshly loaded `transformers` model does), "llama3" and "yarn". Others (e.g. "longrope")
raise `ModelConfigError`.

Sliding-window attention (Mistral, Qwen2 `use_sliding_window`) is applied in the attention mask: a query in
cache slot s sees slot j only if s - window < j <= s, on the layers whose `layer_types` entry is
"sliding_attention".
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from jaxunlearn.models.families import FAMILIES, ModelConfigError, layout_of, model_types


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
# Rematerialisation of each decoder layer in the backward pass (names as in MaxText's remat_policy):
#   none                     keep every activation (no jax.checkpoint)
#   full                     keep only each layer's input; recompute the rest
#   dots                     keep the outputs of every matmul (jax.checkpoint_policies.checkpoint_dots)
#   dots_with_no_batch_dims  keep weight matmuls (projections), recompute attention (MaxText "minimal")
#   save_qkv_proj            keep the query/key/value projections only
#   save_qkv_out_proj        keep the query/key/value and attention output projections
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_qkv_proj", "save_qkv_out_proj")
# jax.nn.dot_product_attention implementations: "xla" runs everywhere; "cudnn" (flash attention) on NVIDIA GPUs
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
SCAN_LAYERS = (True, False, "auto")

# Published shapes (the architecture keys of each model's Hugging Face config.json), for planning
# memory and for random-init runs at full size: ModelConfig.preset("Llama-3.1-8B").
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
HF_SHAPES: dict[str, dict[str, Any]] = {
    "phi-1.5": dict(model_type="phi", vocab_size=51200, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=24, num_attention_heads=32, max_position_embeddings=2048,
                    hidden_act="gelu_new", layer_norm_eps=1e-5, partial_rotary_factor=0.5, rope_theta=10000.0,
                    qk_layernorm=False, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None),
    "Llama-2-7B": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "Llama-3.2-1B": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True,
                         bos_token_id=128000, eos_token_id=128001),
    "Llama-3.1-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), tie_word_embeddings=False,
                         bos_token_id=128000, eos_token_id=128001),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only causal LM.

    `rope_scaling` is a tuple of (key, value) pairs (hashable) or None; `rope_params` gives it as a dict.
    `layer_types` is None (all layers full attention) or one of "full_attention"/"sliding_attention" per layer.
    """

    arch: str = "llama"
    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # how the model runs (not part of the architecture, never written to config.json)
    remat: str = "none"  # one of REMAT_POLICIES (True/False are read as "full"/"none")
    # jax.lax.scan over the stacked layers (False: a Python loop, same numbers; "auto": a loop only in a
    # training step on one CPU device with at most 8 layers, see models.decoder.scans_layers)
    scan_layers: bool | str = "auto"
    attention: str = "xla"  # one of ATTENTION_IMPLEMENTATIONS

    def __post_init__(self):
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        self.validate()

    # ----------------------------------------------------------------- checks and derived values
    def validate(self) -> None:
        """Raise ModelConfigError naming the first inconsistent field."""
        layout_of(self)  # an unregistered arch is an error
        if self.model_type not in model_types(self.arch):
            raise ModelConfigError(f"arch {self.arch!r} needs model_type in {model_types(self.arch)}, "
                                   f"got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ModelConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ModelConfigError(f"hidden_act {self.hidden_act!r} not supported (one of {ACTIVATIONS})")
        if self.remat not in REMAT_POLICIES:
            raise ModelConfigError(f"remat {self.remat!r} not supported (one of {', '.join(REMAT_POLICIES)})")
        if self.scan_layers not in SCAN_LAYERS:
            raise ModelConfigError(f"scan_layers {self.scan_layers!r} not supported (true, false or 'auto')")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ModelConfigError(
                f"attention {self.attention!r} not supported (one of {', '.join(ATTENTION_IMPLEMENTATIONS)})")
        rope_type = self.rope_params.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ModelConfigError(f"rope_scaling type {rope_type!r} not supported (one of {ROPE_TYPES})")
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise ModelConfigError(
                f"rotary dimension head_dim*partial_rotary_factor = {self.rotary_dim} must be even and positive")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ModelConfigError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise ModelConfigError(f"layer_types entries {sorted(bad)} not supported")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ModelConfigError("layer_types uses sliding_attention but sliding_window is not set")

    @property
    def rope_params(self) -> dict[str, Any]:
        """Rope scaling parameters as a dict ({} when there is no scaling)."""
        return dict(self.rope_scaling or ())

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of a layer, or None for full causal attention."""
        if not self.sliding_window:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """`layer_window` of every layer."""
        return tuple(self.layer_window(i) for i in range(self.num_layers))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, vocab_size: int | None = None, **overrides) -> "ModelConfig":
        """Named shapes. Small ones for demos and tests: "tiny-llama", "tiny-llama-gqa", "tiny-qwen2",
        "tiny-mistral", "tiny-phi", "small-llama" (a few million parameters; vocab_size default 256).
        Published ones (HF_SHAPES): "phi-1.5", "Llama-2-7B", "Llama-3.2-1B", "Llama-3.1-8B" (their own
        vocabulary unless vocab_size is given)."""
        if name in HF_SHAPES:
            cfg = cls.from_hf_dict(HF_SHAPES[name], source=f"preset {name}")
            return cfg.replace(**({} if vocab_size is None else {"vocab_size": vocab_size}), **overrides)
        vocab_size = 256 if vocab_size is None else vocab_size
        presets = {
            "tiny-llama": dict(arch="llama", model_type="llama", hidden_size=64, intermediate_size=128,
                               num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16),
            "tiny-llama-gqa": dict(arch="llama", model_type="llama", hidden_size=64, intermediate_size=128,
                                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
            "tiny-qwen2": dict(arch="llama", model_type="qwen2", hidden_size=64, intermediate_size=128,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                               tie_word_embeddings=True, bos_token_id=None, eos_token_id=None),
            "tiny-mistral": dict(arch="llama", model_type="mistral", hidden_size=64, intermediate_size=128,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
            "tiny-phi": dict(arch="phi", model_type="phi", hidden_size=64, intermediate_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, norm_eps=1e-5,
                             hidden_act="gelu_new", partial_rotary_factor=0.5, qkv_bias=True, o_bias=True,
                             mlp_bias=True, lm_head_bias=True),
            "small-llama": dict(arch="llama", model_type="llama", hidden_size=256, intermediate_size=688,
                                num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32),
        }
        if name not in presets:
            raise ModelConfigError(f"unknown model preset {name!r} (one of {sorted(presets) + list(HF_SHAPES)})")
        return cls(vocab_size=vocab_size, **{**presets[name], **overrides})

    # ----------------------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build from a Hugging Face config dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
        `rope_parameters`). `source` names the file in error messages."""
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise ModelConfigError(f"{source}: model_type {model_type!r} not supported (one of {sorted(FAMILIES)})")
        family = FAMILIES[model_type]

        def need(key):
            if d.get(key) is None:
                raise ModelConfigError(f"{source}: missing required key {key!r}")
            return d[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = int(d.get("head_dim") or hidden // heads)
        rope = dict(d.get("rope_parameters") or {})
        legacy = dict(d.get("rope_scaling") or {})
        if "layer_types" in rope or any(isinstance(v, dict) for v in rope.values()):
            raise ModelConfigError(f"{source}: per-layer rope_parameters are not supported")
        rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        partial = float(rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", family.partial_rotary_factor)))
        if not rope and legacy:
            rope = legacy
        legacy_type = rope.pop("type", None)
        rope_type = rope.pop("rope_type", None) or legacy_type or "default"
        scaling = None
        if rope_type != "default":
            if rope_type in ("llama3", "yarn"):
                rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
            scaling = tuple(sorted({"rope_type": rope_type, **rope}.items()))
        eos = d.get("eos_token_id")
        common = dict(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            hidden_act=str(d.get("hidden_act", family.hidden_act)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
        )
        return cls(arch=family.arch, **common, **family.options(d, common["num_layers"]))

    @classmethod
    def from_hf_folder(cls, path: str | pathlib.Path) -> "ModelConfig":
        """Read `config.json` from a Hugging Face checkpoint folder."""
        file = pathlib.Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no config.json in checkpoint folder")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ModelConfigError(f"{file}: not valid JSON ({err})") from None
        return cls.from_hf_dict(d, source=str(file))

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """A config.json dict that `transformers` loads into the same architecture: 5.x `rope_parameters`
        plus the 4.x keys `rope_theta`/`rope_scaling`/`partial_rotary_factor`. `dtype` names the stored
        weight dtype."""
        family = FAMILIES[self.model_type]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **self.rope_params}
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d: dict[str, Any] = {
            "architectures": [family.hf_architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "dtype": dtype,
            "torch_dtype": dtype,
            "use_cache": True,
        }
        d.update(family.hf_keys(self))
        partial = d.pop("partial_rotary_factor", None)  # a family that writes it has it in rope_parameters too
        if partial is not None:
            rope["partial_rotary_factor"] = partial
        d["rope_parameters"] = rope
        # transformers 4.x keys (5.x reads them consistently with rope_parameters)
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = self.rope_params or None
        if partial is not None:
            d["partial_rotary_factor"] = partial
        return d
