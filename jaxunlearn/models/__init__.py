"""Decoder models and Hugging Face interop.

    from jaxunlearn.models import load_hf, split_params, make_apply
    model = load_hf("path/to/hf_checkpoint")             # config.json + *.safetensors, strict
    graphdef, params = split_params(model)
    logits = jax.jit(make_apply(graphdef))(params, input_ids, attention_mask)  # [B, T, V] float32

See `decoder` for masking/position/dtype conventions and the KV-cache decode API, `config` for the
supported architectures, and `hf` for loading/exporting checkpoints.
"""

from jaxunlearn.models.config import ModelConfig, ModelConfigError
from jaxunlearn.models.decoder import (
    LOGICAL_AXES,
    CausalLM,
    default_positions,
    init_cache,
    init_model,
    make_apply,
    make_decode,
    merge_params,
    param_count,
    param_logical_axes,
    split_params,
)
from jaxunlearn.models.hf import CheckpointError, export_hf, hf_state_dict, load_hf

__all__ = [
    "LOGICAL_AXES",
    "CausalLM",
    "CheckpointError",
    "ModelConfig",
    "ModelConfigError",
    "default_positions",
    "export_hf",
    "hf_state_dict",
    "init_cache",
    "init_model",
    "load_hf",
    "make_apply",
    "make_decode",
    "merge_params",
    "param_count",
    "param_logical_axes",
    "split_params",
]
