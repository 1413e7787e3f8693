"""Decoder models (Llama, Llama-3 rope scaling, Mistral, Qwen2/2.5, Phi-1/1.5/2) and Hugging Face interop.

Load a checkpoint folder and compute logits for a padded batch:

    import jax, jax.numpy as jnp
    from transformers import AutoTokenizer
    from jaxunlearn.models import load_hf, split_params, make_apply, export_hf

    model = load_hf(folder)                   # config.json + safetensors (single or sharded), strict
    graphdef, params = split_params(model)    # params: pytree (nnx.State of nnx.Param)
    apply = jax.jit(make_apply(graphdef))
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(texts, padding=True, return_tensors="np")        # right or left padding
    logits = apply(params, jnp.asarray(batch["input_ids"], jnp.int32),
                   jnp.asarray(batch["attention_mask"], jnp.int32))   # [B, T, V] float32
    export_hf(model, out_folder)              # loads unchanged in transformers.AutoModelForCausalLM

`load_hf(folder, dtype="bfloat16", param_dtype="bfloat16")` computes and stores in bf16. Random init:
`init_model(ModelConfig.preset("tiny-llama", vocab_size=...), seed=0)`. See `decoder` for masking,
position, dtype and KV-cache conventions, `config` for the supported configurations, `hf` for
checkpoint files.
"""

from jaxunlearn.models.config import ModelConfig, ModelConfigError
from jaxunlearn.models.decoder import (
    LOGICAL_AXES,
    Apply,
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
    "Apply",
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
