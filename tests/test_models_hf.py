"""Logit parity with `transformers` (PyTorch, fp32) for every supported architecture, HF export that
`transformers` reloads, sharded checkpoints, and strict loading errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxunlearn.models import CheckpointError, ModelConfig, export_hf, load_hf, make_apply, split_params

VOCAB = 128
B, T = 3, 10
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=8)
ARCHS = {
    "llama2": ("LlamaConfig", dict()),
    "llama3_rope_scaling_gqa": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama_tied_biases_headdim": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True,
                                                      mlp_bias=True, head_dim=16, num_key_value_heads=1)),
    "llama_linear_rope": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                  factor=2.0))),
    "llama_dynamic_rope": ("LlamaConfig", dict(max_position_embeddings=8, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "mistral_sliding_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=4)),
    "qwen2_biases_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_yarn_rope": ("Qwen2Config", dict(num_key_value_heads=2, max_position_embeddings=32, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8))),
    "phi": ("PhiConfig", dict()),
    "phi_gqa_tied_qk_layernorm": ("PhiConfig", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                    qk_layernorm=True)),
}


def tokens_and_masks():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (B, T))
    right = (np.arange(T)[None, :] < np.array([[T], [7], [4]])).astype(np.int64)
    left = right[:, ::-1].copy()
    return ids, right, left


def torch_logits(model, ids, mask, positions=None):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=None if positions is None else torch.tensor(positions))
    return out.logits.numpy()


def random_hf_model(name):
    cls_name, kw = ARCHS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls_name)(**{**BASE, **kw})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms and biases start at 1/0; move them so that a wrong mapping shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def hf_case(request, tmp_path_factory):
    """(name, torch model, saved folder, jaxunlearn model loaded from it)."""
    model = random_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder, load_hf(folder)


def test_logits_match_torch_with_right_and_left_padding(hf_case):
    name, torch_model, _, model = hf_case
    ids, right, left = tokens_and_masks()
    graphdef, params = split_params(model)
    apply = jax.jit(make_apply(graphdef))
    for mask in (right, left):
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        ref = torch_logits(torch_model, ids, mask, positions)
        ours = np.asarray(apply(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
        real = mask.astype(bool)
        np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0, err_msg=name)


def test_export_reloads_in_transformers(hf_case, tmp_path):
    name, torch_model, _, model = hf_case
    export_hf(model, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(torch_model)
    ids, right, _ = tokens_and_masks()
    real = right.astype(bool)
    np.testing.assert_allclose(torch_logits(reloaded, ids, right)[real], torch_logits(torch_model, ids, right)[real],
                               atol=1e-5, rtol=0, err_msg=name)
    # and the exported tensors are exactly the original ones
    original = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    for key, value in load_file(tmp_path / "model.safetensors").items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)


def test_sharded_export_roundtrip(tmp_path):
    torch_model = random_hf_model("llama3_rope_scaling_gqa")
    torch_model.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    export_hf(model, tmp_path / "ours", max_shard_size="20KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "ours" / s).is_file() for s in shards)
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, right, _ = tokens_and_masks()
    real = right.astype(bool)
    np.testing.assert_allclose(torch_logits(reloaded, ids, right)[real], torch_logits(torch_model, ids, right)[real],
                               atol=1e-5, rtol=0)
    # transformers' own sharded save loads back into ours bit-identically
    torch_model.save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    again = split_params(load_hf(tmp_path / "hf_sharded"))[1]
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(split_params(model)[1])):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("strict")
    random_hf_model("llama2").save_pretrained(folder)
    return folder


def edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def drop_up_proj(t):
    t.pop("model.layers.1.mlp.up_proj.weight")


def add_extra(t):
    t["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)


def shrink_k_proj(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]


@pytest.mark.parametrize("edit, message", [
    (drop_up_proj, r"missing weight 'model\.layers\.1\.mlp\.up_proj\.weight' \(not in model\.safetensors\)"),
    (add_extra, r"unexpected weight 'model\.layers\.0\.self_attn\.extra\.weight' in model\.safetensors"),
    (shrink_k_proj, r"model\.safetensors: weight 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
                    r"\(31, 32\), expected \(32, 32\)"),
], ids=["missing", "unexpected", "wrong_shape"])
def test_strict_loading_errors_name_the_key(saved_llama, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load_hf(edited_copy(saved_llama, tmp_path / "c", edit))


def test_tolerated_extras_and_folder_errors(saved_llama, tmp_path):
    def add_buffers(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((4,), np.float32)

    load_hf(edited_copy(saved_llama, tmp_path / "inv_freq", add_buffers))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text((saved_llama / "config.json").read_text())
        load_hf(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "inv_freq" / "..")


def test_corrupt_safetensors_file_is_a_checkpoint_error(saved_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved_llama, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_hf(bad)


def test_bf16_checkpoint_loads_and_exports(saved_llama, tmp_path):
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(saved_llama, dtype=torch.bfloat16)
    torch_model.save_pretrained(tmp_path / "bf16")
    model = load_hf(tmp_path / "bf16", dtype="bfloat16", param_dtype="bfloat16")
    leaves = jax.tree.leaves(split_params(model)[1])
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    export_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    ours = load_file(tmp_path / "out" / "model.safetensors")
    for key, value in torch_model.state_dict().items():
        np.testing.assert_array_equal(ours[key].astype(np.float32), value.float().numpy(), err_msg=key)


def test_config_from_folder_matches_transformers(hf_case):
    name, torch_model, folder, model = hf_case
    cfg = ModelConfig.from_hf_folder(folder)
    assert cfg == model.config
    hf = torch_model.config
    assert (cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf.vocab_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
        getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings


def test_tied_checkpoint_with_lm_head_copy(tmp_path):
    """A tied checkpoint that also stores lm_head.weight loads if it equals the embedding, else errors."""
    src = tmp_path / "tied"
    random_hf_model("qwen2_biases_tied").save_pretrained(src)

    def copy_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    def other_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1

    load_hf(edited_copy(src, tmp_path / "same", copy_head))
    with pytest.raises(CheckpointError, match="'lm_head.weight'"):
        load_hf(edited_copy(src, tmp_path / "differs", other_head))


def test_load_places_params_on_given_shardings(saved_llama):
    from flax import nnx

    from jaxunlearn.models import init_model, param_logical_axes

    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor", "vocab": "tensor"}
    _, abstract = split_params(nnx.eval_shape(lambda: init_model(ModelConfig.from_hf_folder(saved_llama))))
    shardings = jax.tree.map(
        lambda ax: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*(rules.get(a) for a in ax))),
        param_logical_axes(abstract), is_leaf=lambda x: isinstance(x, tuple))
    placed = split_params(load_hf(saved_llama, shardings=shardings))[1]
    plain = split_params(load_hf(saved_llama))[1]
    q = placed["layers"]["self_attn"]["q_proj"]["kernel"][...]  # stacked [L, E, H, D]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    for x, y in zip(jax.tree.leaves(placed), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(x, y)


def test_failed_export_leaves_the_existing_export_untouched(tmp_path, monkeypatch):
    from jaxunlearn.models import hf as hf_module

    torch_model = random_hf_model("llama2")
    torch_model.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    out = tmp_path / "ours"
    export_hf(model, out, max_shard_size="20KB")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    calls = []

    def failing_save(*args, **kwargs):  # the second shard write fails (e.g. disk full)
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(hf_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, out, max_shard_size="20KB")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # same files, no temporary folder left
