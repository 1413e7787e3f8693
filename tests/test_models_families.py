"""The model-family registry: a model type on an existing layout is one registry entry, and a new
decoder layout (layer class, HF weight names, config keys) is one module, here this test file."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxunlearn.models import ModelConfig, ModelConfigError, export_hf, init_model, load_hf, make_apply, split_params
from jaxunlearn.models import families
from jaxunlearn.models.decoder import MLP, Attention, RMSNorm


@pytest.fixture
def registries():
    """Whatever a test registers is dropped after it."""
    saved = [(r, dict(r)) for r in (families.FAMILIES, families.LAYOUTS)]
    yield
    for registry, entries in saved:
        registry.clear()
        registry.update(entries)


def test_a_new_model_type_is_one_registry_entry(registries):
    families.register_family(families.Family("toyllama", "ToyLlamaForCausalLM", "llama",
                                             lambda d, n: dict(norm_eps=float(d["eps"]), mlp_bias=True),
                                             lambda cfg: dict(eps=cfg.norm_eps)))
    d = dict(model_type="toyllama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, eps=1e-3)
    cfg = ModelConfig.from_hf_dict(d)
    assert (cfg.arch, cfg.norm_eps, cfg.mlp_bias, cfg.hidden_act) == ("llama", 1e-3, True, "silu")
    assert cfg.to_hf_dict()["architectures"] == ["ToyLlamaForCausalLM"]
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    with pytest.raises(ValueError, match="registered twice"):
        families.register_family(families.Family("toyllama", "X", "llama", lambda d, n: {}, lambda cfg: {}))


def test_families_hold_what_differs_between_model_types():
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2)
    qwen = ModelConfig.from_hf_dict(dict(base, model_type="qwen2", use_sliding_window=True, sliding_window=8,
                                         max_window_layers=2))
    assert (qwen.qkv_bias, qwen.o_bias, qwen.sliding_window) == (True, False, 8)
    assert qwen.layer_types == ("full_attention",) * 2 + ("sliding_attention",) * 2
    phi = ModelConfig.from_hf_dict(dict(base, model_type="phi"))
    assert (phi.arch, phi.hidden_act, phi.partial_rotary_factor, phi.lm_head_bias) == ("phi", "gelu_new", 0.5, True)
    assert families.model_types("phi") == ("phi",) and "mistral" in families.model_types("llama")
    with pytest.raises(ModelConfigError, match="model_type 'gemma' not supported"):
        ModelConfig.from_hf_dict(dict(base, model_type="gemma"))
    with pytest.raises(ModelConfigError, match="arch 'gemma' is not a registered decoder layout"):
        ModelConfig(arch="gemma")
    with pytest.raises(ModelConfigError, match="llama has no qk_layernorm"):
        ModelConfig.preset("tiny-llama", qk_layernorm=True).to_hf_dict()


# --------------------------------------------------------------------------- a new layout, defined here only
class SandwichLayer(nnx.Module):
    """A Llama variant with a norm before and after each sub-block and its own weight names."""

    def __init__(self, cfg, *, rng, dtype, param_dtype):
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.attn_in, self.attn_out, self.ffn_in, self.ffn_out = (
            RMSNorm(cfg.hidden_size, cfg.norm_eps, **common) for _ in range(4))
        self.attn = Attention(cfg, rng=rng, **common)
        self.ffn = MLP(cfg, rng=rng, **common)

    def __call__(self, x, cos, sin, query_slots, kv_mask, window=None, cache=None, cache_index=None):
        attn, cache = self.attn(self.attn_in(x), cos, sin, query_slots, kv_mask, window, cache, cache_index)
        x = x + self.attn_out(attn)
        return x + self.ffn_out(self.ffn(self.ffn_in(x))), cache


def sandwich_weights(cfg):
    rows = [("decoder.embed.weight", ("embed_tokens", "embedding"), "copy", None)]
    for i in range(cfg.num_layers):
        def add(name, path, kind):
            rows.append((f"decoder.blocks.{i}.{name}", ("layers", *path), kind, i))

        for hf, ours in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
            add(f"attn.{hf}.weight", ("attn", ours, "kernel"), "split_out")
        add("attn.wo.weight", ("attn", "o_proj", "kernel"), "split_in")
        for hf, ours in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            add(f"ffn.{hf}.weight", ("ffn", ours, "kernel"), "linear")
        for norm in ("attn_in", "attn_out", "ffn_in", "ffn_out"):
            add(f"{norm}.weight", (norm, "scale"), "copy")
    return rows + [("decoder.norm.weight", ("norm", "scale"), "copy", None),
                   ("head.weight", ("lm_head", "kernel"), "linear", None)]


def register_sandwich():
    families.register_layout(families.Layout("sandwich", SandwichLayer, RMSNorm, sandwich_weights))
    families.register_family(families.Family("sandwich", "SandwichForCausalLM", "sandwich",
                                             lambda d, n: dict(norm_eps=float(d["norm_eps"])),
                                             lambda cfg: dict(norm_eps=cfg.norm_eps)))


def test_a_new_layout_is_one_module(registries, tmp_path):
    register_sandwich()
    cfg = ModelConfig(arch="sandwich", model_type="sandwich", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, norm_eps=1e-5)
    model = init_model(cfg, seed=0)
    graphdef, params = split_params(model)
    assert isinstance(model.layers, SandwichLayer)
    assert params["layers"]["ffn"]["gate_proj"]["kernel"].shape == (2, 32, 64)
    ids = jnp.asarray([[3, 5, 7, 9, 11], [2, 4, 6, 0, 0]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.int32)
    logits = jax.jit(make_apply(graphdef))(params, ids, mask)
    assert logits.shape == (2, 5, 64) and bool(jnp.isfinite(logits).all())

    folder = export_hf(model, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["norm_eps"]) == (
        ["SandwichForCausalLM"], "sandwich", 1e-5)
    tensors = load_file(folder / "model.safetensors")
    assert set(tensors) == {row[0] for row in sandwich_weights(cfg)}
    assert tensors["decoder.blocks.1.attn.wk.weight"].shape == (16, 32)  # HF [kv_heads * head_dim, hidden]

    loaded = load_hf(folder)
    assert loaded.config == cfg
    loaded_graphdef, loaded_params = split_params(loaded)
    jax.tree.map(np.testing.assert_array_equal, loaded_params, params)
    np.testing.assert_array_equal(jax.jit(make_apply(loaded_graphdef))(loaded_params, ids, mask), logits)
