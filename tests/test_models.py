"""Decoder behaviour without a reference implementation: masks, positions, KV cache, dtypes, axes, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn.models import (
    LOGICAL_AXES,
    ModelConfig,
    ModelConfigError,
    init_cache,
    init_model,
    make_apply,
    make_decode,
    merge_params,
    param_logical_axes,
    split_params,
)
from jaxunlearn.models.config import REMAT_POLICIES

VOCAB = 97
B, T = 3, 12


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(0, VOCAB, (B, T)), jnp.int32)


@pytest.fixture(scope="module", params=["tiny-llama-gqa", "tiny-phi"])
def built(request):
    """(cfg, params, jitted apply, jitted decode) for two architectures; with a sliding window on llama."""
    overrides = {"sliding_window": 5} if request.param.startswith("tiny-llama") else {}
    cfg = ModelConfig.preset(request.param, vocab_size=VOCAB, **overrides)
    graphdef, params = split_params(init_model(cfg, seed=1))
    # non-trivial norms/biases so that every parameter matters
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), params)
    return cfg, params, jax.jit(make_apply(graphdef)), jax.jit(make_decode(graphdef))


def right_padded_mask():
    lengths = np.array([T, 8, 5])
    return jnp.asarray(np.arange(T)[None, :] < lengths[:, None], jnp.int32), lengths


def test_padding_does_not_change_real_token_logits(built, tokens):
    """Right padding (any pad contents) and left padding give the same logits at real tokens."""
    cfg, params, apply, _ = built
    mask, lengths = right_padded_mask()
    padded = np.asarray(apply(params, tokens, mask))
    other_pads = jnp.where(mask == 1, tokens, (tokens * 7 + 3) % VOCAB)
    np.testing.assert_array_equal(np.asarray(apply(params, other_pads, mask))[np.asarray(mask) == 1],
                                  padded[np.asarray(mask) == 1])
    left_ids = np.zeros((B, T), np.int32)
    left_mask = np.zeros((B, T), np.int32)
    for b, n in enumerate(lengths):
        left_ids[b, T - n:] = np.asarray(tokens[b, :n])
        left_mask[b, T - n:] = 1
    left = np.asarray(apply(params, jnp.asarray(left_ids), jnp.asarray(left_mask)))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(left[b, T - n:], padded[b, :n], atol=2e-5)
    assert np.isfinite(padded).all() and np.isfinite(left).all()


def test_kv_cache_prefill_then_decode_matches_full_forward(built, tokens):
    cfg, params, apply, decode = built
    max_len = T + 2
    prompt = 7
    # left-padded prompts of lengths 7, 5, 3 followed by T - 7 decoded tokens each
    lengths = np.array([7, 5, 3])
    kv_mask = np.zeros((B, max_len), np.int32)
    for b, n in enumerate(lengths):
        kv_mask[b, prompt - n:T] = 1
    ids = jnp.where(jnp.asarray(kv_mask[:, :T]) == 1, tokens, 0)
    full = apply(params, ids, jnp.asarray(kv_mask[:, :T]))
    positions = np.maximum(np.cumsum(kv_mask, axis=1) - 1, 0)
    cache = init_cache(cfg, B, max_len, "float32")
    logits, cache = decode(params, ids[:, :prompt], jnp.asarray(positions[:, :prompt]), jnp.asarray(kv_mask),
                           cache, 0)
    steps = [logits]
    for s in range(prompt, T):
        step_logits, cache = decode(params, ids[:, s:s + 1], jnp.asarray(positions[:, s:s + 1]),
                                    jnp.asarray(kv_mask), cache, s)
        steps.append(step_logits)
    cached = jnp.concatenate(steps, axis=1)
    real = kv_mask[:, :T].astype(bool)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=2e-5)


def test_decode_prepared_params_and_bf16_cache(tokens):
    """decode.prepare (layers sliced once, what a decoding loop passes) gives bitwise the same logits and cache;
    a bf16 model decodes on CPU (16-bit attention products over a bf16 cache) close to fp32. Grouped-query
    attention with a sliding window."""
    cfg = ModelConfig.preset("tiny-llama-gqa", vocab_size=VOCAB, sliding_window=5)
    graphdef, params = split_params(init_model(cfg, seed=1))
    mask = jnp.ones((B, T + 1), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T + 1)[None], (B, T + 1))

    def run(decode, p, dtype):
        cache = init_cache(cfg, B, T + 1, dtype)
        first, cache = decode(p, tokens, positions[:, :T], mask, cache, 0)
        step, cache = decode(p, tokens[:, :1], positions[:, T:], mask, cache, T)
        return first, step, cache["key"][-1], cache["value"][0]

    decode = make_decode(graphdef)
    plain, prepared = jax.jit(lambda p: (run(decode, p, "float32"), run(decode, decode.prepare(p), "float32")))(params)
    for x, y in zip(plain, prepared):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    decode16 = make_decode(split_params(init_model(cfg, seed=1, dtype="bfloat16"))[0])
    half = jax.jit(lambda p: run(decode16, decode16.prepare(p), "bfloat16"))(params)
    assert half[2].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half[1], np.float32), np.asarray(plain[1]), atol=0.05)


def test_bf16_forward_close_to_fp32(built, tokens):
    """bf16 parameters and compute: logits within 0.05 absolute of fp32 on tiny random models whose logits
    are O(1) (measured: ~0.015). bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.004); rounding the weights, every
    activation and two layers of 64-wide matmuls and residual adds accumulates tens of such steps, and
    the logits themselves are accumulated in fp32. Greedy tokens must mostly agree."""
    cfg, params, apply, _ = built
    mask, _ = right_padded_mask()
    ref = np.asarray(apply(params, tokens, mask))
    graphdef16, p16 = split_params(init_model(cfg, dtype="bfloat16", param_dtype="bfloat16"))
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert jax.tree.structure(p16) == jax.tree.structure(bf16_params)
    low = np.asarray(jax.jit(make_apply(graphdef16))(bf16_params, tokens, mask))
    real = np.asarray(mask).astype(bool)
    assert low.dtype == np.float32 and np.isfinite(low).all()
    err = np.abs(low - ref)[real]
    assert err.max() < 0.05, err.max()
    assert err.max() > 0  # it really ran in lower precision
    assert np.mean(np.argmax(low, -1)[real] == np.argmax(ref, -1)[real]) > 0.8


def test_logical_axes_cover_every_param():
    for name in ("tiny-llama", "tiny-qwen2", "tiny-phi"):
        model = init_model(ModelConfig.preset(name, vocab_size=VOCAB))
        _, params = split_params(model)
        axes = param_logical_axes(model)
        seen = []

        def check(x, ax):
            assert isinstance(ax, tuple) and len(ax) == x.ndim, (x.shape, ax)
            assert all(a in LOGICAL_AXES for a in ax), ax
            seen.append(ax)

        jax.tree.map(check, params, axes)
        assert len(seen) == len(jax.tree.leaves(params))
        # axes tree usable on its own, tuples as leaves
        specs = jax.tree.map(lambda ax: jax.sharding.PartitionSpec(*ax), axes,
                             is_leaf=lambda x: isinstance(x, tuple))
        assert len(jax.tree.leaves(specs)) == len(seen)


def test_same_seed_same_bits_and_merge_roundtrip(tokens):
    cfg = ModelConfig.preset("tiny-llama", vocab_size=VOCAB)
    a = split_params(init_model(cfg, seed=3))[1]
    b = split_params(init_model(cfg, seed=3))[1]
    c = split_params(init_model(cfg, seed=4))[1]
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
    graphdef, params = split_params(init_model(cfg, seed=3))
    assert graphdef == split_params(init_model(cfg, seed=4))[0]  # static structure is hashable and equal
    again = split_params(merge_params(graphdef, params))[1]
    assert jax.tree.structure(again) == jax.tree.structure(params)
    assert all(x is y for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(params)))


def _graphdef(cfg):
    return split_params(nnx.eval_shape(lambda: init_model(cfg)))[0]


def _grad(cfg, tokens):
    apply = make_apply(_graphdef(cfg))
    return jax.grad(lambda p: jnp.mean(apply(p, tokens) ** 2))


def test_remat_policies(tokens):
    """Every named policy puts the layer body under jax.checkpoint once (inside the scan) or once per layer
    (Python loop), "none" not at all; gradients equal those without remat (JAX recomputes the same ops)."""
    cfg = ModelConfig.preset("tiny-llama", vocab_size=VOCAB)
    params = split_params(init_model(cfg, seed=1))[1]
    for policy in REMAT_POLICIES:
        for scan in (True, False):
            jaxpr = str(jax.make_jaxpr(_grad(cfg.replace(remat=policy, scan_layers=scan), tokens))(params))
            expected = 0 if policy == "none" else (1 if scan else cfg.num_layers)
            assert jaxpr.count("remat") == expected, (policy, scan)
    want = jax.jit(_grad(cfg, tokens))(params)
    for policy in ("full", "dots_with_no_batch_dims", "save_qkv_proj"):
        got = jax.jit(_grad(cfg.replace(remat=policy), tokens))(params)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_remat_and_attention_names_checked():
    assert ModelConfig.preset("tiny-llama", remat=True).remat == "full"
    assert ModelConfig.preset("tiny-llama", remat=False).remat == "none"
    with pytest.raises(ModelConfigError, match=r"remat 'minimal' not supported \(one of none, full, dots"):
        ModelConfig.preset("tiny-llama", remat="minimal")
    with pytest.raises(ModelConfigError, match=r"attention 'flash' not supported \(one of xla, cudnn\)"):
        ModelConfig.preset("tiny-llama", attention="flash")
    if jax.default_backend() != "gpu":
        cudnn = ModelConfig.preset("tiny-llama", vocab_size=VOCAB, attention="cudnn")
        with pytest.raises(ModelConfigError, match="attention 'cudnn' needs an NVIDIA GPU"):
            jax.eval_shape(make_apply(_graphdef(cudnn)), split_params(nnx.eval_shape(lambda: init_model(cudnn)))[1],
                           jnp.zeros((1, 4), jnp.int32))


def test_layers_are_stacked_with_a_layers_axis():
    cfg = ModelConfig.preset("tiny-qwen2", vocab_size=VOCAB, num_layers=3)
    model = init_model(cfg)
    _, params = split_params(model)
    axes = param_logical_axes(model)
    layer_leaves = jax.tree.leaves(params["layers"])
    layer_axes = jax.tree.leaves(axes["layers"], is_leaf=lambda x: isinstance(x, tuple))
    assert len(layer_leaves) == len(layer_axes) > 0
    for x, ax in zip(layer_leaves, layer_axes):
        assert x.shape[0] == 3 and ax[0] == "layers", (x.shape, ax)
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, 64, 4, 16)
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (3, 64, 2, 16)  # GQA: 2 kv heads


@pytest.fixture(scope="module")
def mixed_windows():
    """A Qwen2-style model whose layers differ (full, sliding, sliding), so the per-layer window is data."""
    cfg = ModelConfig.preset("tiny-qwen2", vocab_size=VOCAB, num_layers=3, sliding_window=4,
                             layer_types=("full_attention", "sliding_attention", "sliding_attention"))
    graphdef, params = split_params(init_model(cfg, seed=5))
    return cfg, params


def test_scan_and_python_loop_agree(mixed_windows, tokens):
    """scan_layers=False runs the same stacked parameters in a Python loop: same logits and cached decode."""
    cfg, params = mixed_windows
    mask, _ = right_padded_mask()
    out = {}
    for scan in (True, False):
        c = cfg.replace(scan_layers=scan)
        graphdef = _graphdef(c)
        logits = jax.jit(make_apply(graphdef))(params, tokens, mask)
        cache = init_cache(c, B, T, "float32")
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        step, cache = jax.jit(make_decode(graphdef))(params, tokens, positions, mask, cache, 0)
        out[scan] = (logits, step, cache["key"])
    for x, y in zip(out[True], out[False]):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert [k.shape for k in out[True][2]] == [(B, cfg.num_kv_heads, cfg.head_dim, T)] * 3


def test_window_differs_per_layer(mixed_windows, tokens):
    """The window of a sliding layer reaches only the last `sliding_window` slots: changing a token that
    far back changes the full-attention model's last logits but not those of an all-sliding one."""
    cfg, params = mixed_windows
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % VOCAB)
    sliding = cfg.replace(layer_types=("sliding_attention",) * 3)
    for c, moves in ((cfg, True), (sliding, False)):
        apply = jax.jit(make_apply(_graphdef(c)))
        delta = np.abs(np.asarray(apply(params, tokens) - apply(params, changed)))[:, -1].max()
        assert (delta > 1e-4) == moves, (c.layer_types, delta)


def test_hidden_after_k_layers_is_the_first_k_layers(mixed_windows, tokens):
    """hidden(num_layers=k): the residual stream of a model made of the first k layers' parameters."""
    cfg, params = mixed_windows
    mask, _ = right_padded_mask()
    apply = make_apply(_graphdef(cfg))
    hidden = jax.jit(apply.hidden, static_argnames="num_layers")
    short = cfg.replace(num_layers=2, layer_types=cfg.layer_types[:2])
    sliced = jax.tree.map(lambda x: x, params)
    sliced["layers"] = jax.tree.map(lambda x: x[:2], params["layers"])
    short_hidden = jax.jit(make_apply(_graphdef(short)).hidden, static_argnames="num_layers")
    for k in (1, 2):
        np.testing.assert_allclose(hidden(params, tokens, mask, num_layers=k),
                                   short_hidden(sliced, tokens, mask, num_layers=k), atol=1e-6)
    embedded = np.asarray(params["embed_tokens"]["embedding"][...])[np.asarray(tokens)]
    np.testing.assert_array_equal(hidden(params, tokens, mask, num_layers=0), embedded)
    logits = jax.jit(lambda p: apply.head(p, apply.hidden(p, tokens, mask)))(params)
    np.testing.assert_allclose(logits, jax.jit(apply)(params, tokens, mask), atol=1e-6)


def test_program_size_does_not_grow_with_depth(tokens):
    """With scan_layers the lowered forward+backward is one loop body whatever the depth; unrolled, it grows."""

    def hlo_size(layers, scan):
        cfg = ModelConfig.preset("tiny-llama", vocab_size=VOCAB, num_layers=layers, scan_layers=scan,
                                 remat="full")
        params = split_params(nnx.eval_shape(lambda: init_model(cfg)))[1]
        return len(jax.jit(_grad(cfg, tokens)).lower(params).as_text())

    two, six = hlo_size(2, True), hlo_size(6, True)
    assert abs(six - two) < 0.02 * two, (two, six)
    assert hlo_size(6, False) > 2 * hlo_size(2, False)


def test_config_hf_dict_roundtrip_and_errors():
    for name in ("tiny-llama", "tiny-llama-gqa", "tiny-qwen2", "tiny-mistral", "tiny-phi"):
        cfg = ModelConfig.preset(name, vocab_size=VOCAB)
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    scaled = ModelConfig.preset("tiny-llama", rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                                            ("low_freq_factor", 1.0),
                                                            ("original_max_position_embeddings", 64),
                                                            ("rope_type", "llama3")))
    assert ModelConfig.from_hf_dict(scaled.to_hf_dict()) == scaled
    # transformers 4.x style keys
    legacy = {**scaled.to_hf_dict(), "rope_theta": 10000.0,
              "rope_scaling": {"type": "linear", "factor": 2.0}}
    del legacy["rope_parameters"]
    assert ModelConfig.from_hf_dict(legacy).rope_params == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ModelConfigError, match="model_type 'gpt2'"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"})
    with pytest.raises(ModelConfigError, match="'hidden_size'"):
        ModelConfig.from_hf_dict({"model_type": "llama", "vocab_size": 10})
    with pytest.raises(ModelConfigError, match="longrope"):
        ModelConfig.from_hf_dict({**scaled.to_hf_dict(), "rope_parameters": {"rope_type": "longrope"}})
    with pytest.raises(ModelConfigError, match="num_kv_heads"):
        ModelConfig.preset("tiny-llama", num_kv_heads=3)
    with pytest.raises(ModelConfigError, match="unknown model preset"):
        ModelConfig.preset("huge")


def test_weight_decay_mask_judges_stacked_layers_per_layer():
    """optim.decay_mask decides per layer, as before stacking: norm scales ([L, D] when stacked) do not decay."""
    from jaxunlearn.checkpoint import canonical_path
    from jaxunlearn.optim import decay_mask

    params = split_params(nnx.eval_shape(lambda: init_model(ModelConfig.preset("tiny-qwen2", vocab_size=VOCAB))))[1]
    flags = {canonical_path(p): m for p, m in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    assert flags["layers/self_attn/q_proj/kernel"] and flags["embed_tokens/embedding"]
    assert not flags["layers/input_layernorm/scale"] and not flags["norm/scale"]
    assert flags["layers/self_attn/q_proj/bias"]  # [L, H, D]: as before stacking, a [H, D] bias decays


def test_run_config_model_options_reach_the_model():
    """model.scan_layers / remat / attention from a run config (with overrides) build the model that runs;
    a bad name is one ConfigError line listing the names."""
    from jaxunlearn.config import ConfigError, apply_overrides, from_dict
    from jaxunlearn.rundir import model_setup
    from jaxunlearn.sharding import make_mesh

    cfg = apply_overrides(from_dict({}), ["model.remat=save_qkv_proj", "model.scan_layers=false"])
    setup = model_setup(ModelConfig.preset("tiny-llama", vocab_size=VOCAB), cfg, make_mesh(1, 1, 1))
    assert (setup.model_cfg.remat, setup.model_cfg.scan_layers, setup.model_cfg.attention) == ("save_qkv_proj", False, "xla")
    assert setup.graphdef == _graphdef(setup.model_cfg)
    with pytest.raises(ConfigError, match=r"^config\.model\.remat: unknown remat 'minimal' \(one of none, full, dots, "
                                          r"dots_with_no_batch_dims, save_qkv_proj, save_qkv_out_proj\)$"):
        from_dict({"model": {"remat": "minimal"}})
    with pytest.raises(ConfigError, match=r"model\.attention: unknown attention 'flash' \(one of xla, cudnn\)"):
        from_dict({"model": {"attention": "flash"}})


def test_single_cpu_device_products_equal_plain_products(tokens, monkeypatch):
    """The one-CPU-device matrix products (decoder.contract's custom VJP, transposing the smaller operand of
    the weight gradient) give the logits and gradients of plain dot_general, fp32 and bf16, tied and
    untied heads, remat on; the suite's 8 simulated devices would otherwise never take that path."""
    from jaxunlearn.models import decoder

    for preset, dtype, remat in (("tiny-llama-gqa", "float32", "none"), ("tiny-phi", "float32", "full"),
                                 ("tiny-llama", "bfloat16", "dots")):
        cfg = ModelConfig.preset(preset, vocab_size=VOCAB, remat=remat)
        graphdef, params = split_params(init_model(cfg, seed=1, dtype=dtype))
        apply = make_apply(graphdef)
        results = []
        for custom in (False, True):
            monkeypatch.setattr(decoder, "transposes_smaller_operand", lambda c=custom: c)
            results.append(jax.jit(jax.value_and_grad(lambda p: _loss(apply, p, tokens)))(params))
        (want, want_g), (got, got_g) = results
        tol = 1e-5 if dtype == "float32" else 2e-2
        np.testing.assert_allclose(got, want, rtol=tol)
        for x, y in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
            # bf16: the one-device backward products take bf16 inputs (the head's float32 logits gradient
            # rounded, as torch's autocast does), so gradients differ by bf16 rounding of the leaf's scale
            atol = tol * 1e-2 if dtype == "float32" else tol * np.abs(y).max()
            np.testing.assert_allclose(x, y, rtol=tol, atol=atol)


def test_scan_layers_auto_unrolls_only_one_cpu_device_training_steps(tokens, monkeypatch):
    """scan_layers="auto" (the default) unrolls the layers only while a training step's loss is traced
    (train.make_step_fn) on one CPU device with at most AUTO_UNROLL_MAX_LAYERS layers; forward passes,
    meshes of several devices, deeper models and an explicit true keep the scan. A bad value is one line."""
    import optax

    from jaxunlearn.config import ConfigError, from_dict
    from jaxunlearn.models import decoder
    from jaxunlearn.train import make_step_fn

    cfg = ModelConfig.preset("tiny-llama", vocab_size=VOCAB)
    assert cfg.scan_layers == "auto" and from_dict({}).model.scan_layers == "auto"
    params = split_params(nnx.eval_shape(lambda: init_model(cfg)))[1]
    apply = make_apply(_graphdef(cfg))

    def objective(p, ref, batch, apply):
        return jnp.mean(apply(p, batch) ** 2), {}

    for one_cpu in (False, True):
        monkeypatch.setattr(decoder, "transposes_smaller_operand", lambda c=one_cpu: c)
        step = make_step_fn(objective, apply, optax.sgd(0.1))  # a new function: JAX caches traces per function
        assert decoder.scans_layers(cfg)
        with decoder.training_trace():
            assert decoder.scans_layers(cfg) is not one_cpu
            assert decoder.scans_layers(cfg.replace(scan_layers=True))
            assert decoder.scans_layers(cfg.replace(num_layers=decoder.AUTO_UNROLL_MAX_LAYERS + 1))
        step_jaxpr = str(jax.make_jaxpr(step)(params, optax.sgd(0.1).init(params), tokens, params))
        assert ("scan[" in step_jaxpr) is not one_cpu, one_cpu
        assert "scan[" in str(jax.make_jaxpr(apply)(params, tokens))
    with pytest.raises(ConfigError, match=r"model\.scan_layers: unknown scan_layers 'sometimes' \(one of true, false, "
                                          r"auto\)$"):
        from_dict({"model": {"scan_layers": "sometimes"}})
    with pytest.raises(ModelConfigError, match="scan_layers 'sometimes' not supported"):
        cfg.replace(scan_layers="sometimes")


def test_single_cpu_device_transposed_operand_is_exact():
    """decoder._transposed (the weight gradient's transposed operand; an identity product for 16-bit
    dtypes) equals a.T bit for bit."""
    from jaxunlearn.models import decoder

    a = np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32) * 1e3
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x = jnp.asarray(a, dtype)
        got = jax.jit(decoder._transposed)(x)
        assert got.dtype == x.dtype and got.shape == (16, 24)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x.T, np.float32))


def _loss(apply, params, tokens):
    logits = apply(params, tokens)
    return jax.nn.logsumexp(logits, -1).mean() - logits[..., 0].mean()


def test_attention_in_query_blocks_equals_one_block(built, tokens, monkeypatch):
    """causal_attention in blocks of 4 queries (T = 12: three blocks, keys up to each block) gives the logits
    and the parameter gradients of one block over all queries (GQA + sliding window, and Phi)."""
    from jaxunlearn.models import decoder

    cfg, params, _, _ = built
    mask, _ = right_padded_mask()
    graphdef = _graphdef(cfg)

    def loss(p):
        return jnp.sum(jnp.tanh(make_apply(graphdef)(p, tokens, mask)) * mask[..., None])

    out = {}
    for block in (4, T):
        monkeypatch.setattr(decoder, "ATTENTION_BLOCK", block)
        out[block] = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(out[4][0], out[T][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[4][1]), jax.tree.leaves(out[T][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
