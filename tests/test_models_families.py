"""The model-family registry: a model type running on an existing layout is one registry entry."""

import pytest

from jaxunlearn.models import ModelConfig, ModelConfigError
from jaxunlearn.models import families


def test_a_new_model_type_is_one_registry_entry(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))
    from jaxunlearn.models import config as model_config

    monkeypatch.setattr(model_config, "FAMILIES", families.FAMILIES)
    families.register_family(families.Family("toyllama", "ToyLlamaForCausalLM", "llama",
                                             lambda d, n: dict(norm_eps=float(d["eps"]), mlp_bias=True)))
    d = dict(model_type="toyllama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, eps=1e-3)
    cfg = ModelConfig.from_hf_dict(d)
    assert (cfg.arch, cfg.norm_eps, cfg.mlp_bias, cfg.hidden_act) == ("llama", 1e-3, True, "silu")
    assert cfg.to_hf_dict()["architectures"] == ["ToyLlamaForCausalLM"]
    with pytest.raises(ValueError, match="registered twice"):
        families.register_family(families.Family("toyllama", "X", "llama", lambda d, n: {}))


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
