"""Flax NNX decoder-only causal LM (Llama family and Phi) and its functional API.

Functional use (everything jittable):

    model = init_model(cfg, seed=0)                 # or load_hf(folder)
    graphdef, params = split_params(model)          # params: nnx.State of nnx.Param
    apply = make_apply(graphdef)
    logits = jax.jit(apply)(params, input_ids, attention_mask)   # [B, T, V] float32

Attention masks: a query at slot t sees key slot j iff j <= t and attention_mask[b, j] == 1 (and, on
sliding-window layers, j > t - window). Default positions are cumsum(attention_mask) - 1 clipped at 0, so
right and left padding both give each real token its position in its own sequence. attention_mask may also
hold segment ids of sequences packed side by side, or be a boolean [B, T, T] of which tokens each token may
see (causality applied on top; positions then explicit): see `attention_mask()`.

Dtypes: `param_dtype` is the storage dtype of parameters; `dtype` is the compute dtype of matmuls and
activations. Norms, rotary tables and attention softmax run in float32; logits are returned in float32
(the lm_head matmul accumulates in float32).

Every parameter carries its logical axis names (nnx metadata `out_sharding`, not applied eagerly);
`param_logical_axes` returns them as a tree with the structure of `params`.

Layouts: the layer class and the norm are those of the config's decoder layout (`arch`, registered in
models/families.py): DecoderLayer and RMSNorm for "llama", ParallelDecoderLayer and LayerNorm for "phi".

Layers: every decoder-layer parameter is stored stacked, [num_layers, ...] with the leading logical axis
"layers" (never sharded), e.g. params["layers"]["self_attn"]["q_proj"]["kernel"] is [L, E, H, D]. The
layers run as one jax.lax.scan over that axis (ModelConfig.scan_layers; program size and compile time do
not grow with depth) or as a Python loop over the same parameters, each layer rematerialised with the
policy named by ModelConfig.remat. Attention (ModelConfig.attention) takes a boolean causal + padding
(+ sliding-window) mask and the fewer key/value heads of grouped-query attention as they are: "xla" is
`causal_attention` (blocks of queries over the keys up to the block, no work above the diagonal); "cudnn" is
jax.nn.dot_product_attention's cuDNN kernel. Decoding with a KV cache uses `cached_attention` either way.

KV cache (generation): `init_cache(cfg, batch, max_len, dtype)` gives {"key", "value"}, each a list of one
[B, num_kv_heads, head_dim, max_len] array per layer (slots last: the layout both attention matmuls read
without a transposed copy); `make_decode(graphdef)` gives
`decode(params, input_ids[B,S], positions[B,S], kv_mask[B,max_len], cache, cache_index) -> (logits, cache)`,
which writes the S new keys/values at slots [cache_index, cache_index + S) and lets the query at slot s
attend to slot j iff j <= s and kv_mask[b, j] == 1; `decode.prepare(params)` is what a decoding loop
passes as params instead (built once, outside the loop; see make_decode).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxunlearn.models.config import ModelConfig, ModelConfigError
from jaxunlearn.models.families import layout_of
from jaxunlearn.sharding import constrain, mesh_context

LAYERS_AXIS = "layers"
LOGICAL_AXES = (LAYERS_AXIS, "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim")
# logical axes of activations (jaxunlearn.sharding.ACTIVATION_RULES)
ACT_EMBED = ("batch", "length", "act_embed")
ACT_HEADS = ("batch", "length", "heads", "head_dim")
ACT_KV_HEADS = ("batch", "length", "kv_heads", "head_dim")
ACT_MLP = ("batch", "length", "mlp")
ACT_VOCAB = ("batch", "length", "vocab")


# --------------------------------------------------------------------------- parameters
class NormalSource:
    """Hands out consecutive slices of one flat normal(0, 1) draw, so that initialising a whole model is one
    random op (one compile, jittable, same bits eagerly or under jit). Built with `flat=None` it only
    counts the values needed and hands out zeros."""

    def __init__(self, flat=None):
        self.flat = np.asarray(flat) if flat is not None and not isinstance(flat, jax.core.Tracer) else flat
        self.count = 0

    def take(self, shape) -> jax.Array:
        n = int(np.prod(shape))
        start, self.count = self.count, self.count + n
        if self.flat is None:
            return jnp.zeros(shape, jnp.float32)
        return jnp.asarray(self.flat[start:start + n].reshape(shape))


def _param(rng: NormalSource | None, shape, axes, param_dtype, init: str = "normal", std: float = 0.02):
    """An nnx.Param with logical axis metadata (not applied eagerly); rng=None gives zeros for "normal"
    (abstract targets for loading)."""
    if init == "ones":
        value = jnp.ones(shape, param_dtype)
    elif init == "zeros" or rng is None:
        value = jnp.zeros(shape, param_dtype)
    else:
        value = (rng.take(shape) * std).astype(param_dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def contract(x: jax.Array, kernel: jax.Array, n_in: int, out_dtype=None) -> jax.Array:
    """x . kernel over x's last `n_in` dims and kernel's first `n_in` dims (out_dtype: the accumulation and
    result dtype; default the inputs' dtype).

    On one CPU device (`transposes_smaller_operand`) the product runs as one [M, K] x [K, N] matrix
    product whose weight gradient transposes the smaller of its two [M, .] operands first
    (`_matmul`): XLA:CPU otherwise contracts the gradient's leading M axis by copying the larger one
    transposed (the [tokens, vocab] logits gradient, the [tokens, mlp] activations' gradient), a
    strided copy that cost about 16% of the 2-core MOX step (experiments/bench/README.md). Same
    products, same float32 gradients; 16-bit products accumulate in float32 and the backward products
    take 16-bit inputs (`_dot_general`, `_transposed`), so bfloat16 gradients differ from the plain
    product's by bfloat16 rounding. Other backends and meshes keep the plain dot_general."""
    if not transposes_smaller_operand():
        axes = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, kernel, (axes, ((), ())), preferred_element_type=out_dtype)
    lead, out = x.shape[: x.ndim - n_in], kernel.shape[n_in:]
    k = int(np.prod(kernel.shape[:n_in]))
    y = _matmul(x.reshape(-1, k), kernel.reshape(k, -1), None if out_dtype is None else jnp.dtype(out_dtype))
    return y.reshape(*lead, *out)


def transposes_smaller_operand() -> bool:
    """Whether `contract` uses `_matmul` (a single CPU device)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _dot(a, b, out_dtype):
    """a [M, K] . b [K, N] (inputs promoted to one dtype) in out_dtype (None: that dtype). 16-bit inputs
    accumulate in float32, then round: XLA:CPU runs such products on YNNPACK (AMX / AVX512-BF16 where
    the CPU has them); a bfloat16-output product falls back to a float32 emulation about 3x slower."""
    return _dot_general(a, b, ((1,), (0,)), out_dtype)


def _dot_general(a, b, contracting, out_dtype):
    dtype = jnp.promote_types(a.dtype, b.dtype)
    out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
    acc = jnp.float32 if jnp.dtype(dtype).itemsize < 4 else out_dtype
    y = jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (contracting, ((), ())), preferred_element_type=acc)
    return y.astype(out_dtype)


def _transposed(a):
    """a.T [N, M] of a [M, N] as an operand XLA cannot fold back into the next product. 16-bit: an
    identity product (exact), since XLA:CPU folds any transposing copy into the dot and then runs a
    16-bit dot with a transposed operand as float32 without YNNPACK (4-6x slower)."""
    if a.dtype.itemsize < 4:
        return _dot_general(jnp.eye(a.shape[1], dtype=a.dtype), a, ((1,), (1,)), None)
    # the barrier keeps XLA from folding the transpose back into the product
    return jax.lax.optimization_barrier(a.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, out_dtype):
    return _dot(x, w, out_dtype)


def _matmul_fwd(x, w, out_dtype):
    return _dot(x, w, out_dtype), (x, w)


def _matmul_bwd(out_dtype, res, g):
    x, w = res
    # the backward products take their inputs in the forward's dtype (a float32 logits gradient is
    # rounded to bfloat16 for a bfloat16 head, as torch's autocast does), accumulating in float32
    g = g.astype(jnp.promote_types(x.dtype, w.dtype))
    dx = _dot_general(g, w, ((1,), (1,)), jnp.float32)
    if w.shape[0] <= w.shape[1]:  # x [M, K] is the smaller: dW = x^T g
        dw = _dot(_transposed(x), g, jnp.float32)
    else:  # g [M, N] is the smaller: dW = (g^T x)^T, in float32 (XLA folds the .T into the product, and
        # XLA:CPU has no 16-bit kernel for a product with a transposed operand)
        dw = _dot(_transposed(g), x.astype(jnp.float32), jnp.float32).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nnx.Module):
    """y = x . kernel (+ bias); kernel of any rank: contracts `n_in` leading kernel dims with x's trailing dims."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, bias, rng, dtype, param_dtype):
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = _param(rng, (*in_shape, *out_shape), (*in_axes, *out_axes), param_dtype)
        self.bias = _param(rng, tuple(out_shape), tuple(out_axes), param_dtype, init="zeros") if bias else None

    def __call__(self, x, out_dtype=None):
        """x . kernel (+ bias), in out_dtype (default the compute dtype)."""
        y = contract(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.n_in, out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, size, eps, *, dtype, param_dtype):
        self.eps, self.dtype = eps, dtype
        self.scale = _param(None, (size,), ("embed",), param_dtype, init="ones")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, size, eps, *, dtype, param_dtype, axis="embed"):
        self.eps, self.dtype = eps, dtype
        self.scale = _param(None, (size,), (axis,), param_dtype, init="ones")
        self.bias = _param(None, (size,), (axis,), param_dtype, init="zeros")

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def _norm(cfg: ModelConfig, dtype, param_dtype):
    """The norm of cfg's layout (RMSNorm for "llama", LayerNorm for "phi") over the hidden size."""
    return layout_of(cfg).norm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)


def activation(name: str) -> Callable:
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported activation {name!r}")


# --------------------------------------------------------------------------- rotary embeddings
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] (float32), including static rope scaling."""
    dim = cfg.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    params = cfg.rope_params
    kind = params.get("rope_type", "default")
    if kind == "linear":
        inv = (inv / np.float32(params["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > old_len / low, inv / factor, inv).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        inv = _yarn_inv_freq(cfg, params)
    return inv


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_scale(cfg: ModelConfig) -> float:
    """Factor applied to cos/sin (YaRN's attention temperature; 1 for every other rope type)."""
    params = cfg.rope_params
    if params.get("rope_type") != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = _yarn_factor(cfg, params)
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _yarn_factor(cfg: ModelConfig, params: dict) -> float:
    if params.get("factor") is None:
        return cfg.max_position_embeddings / params["original_max_position_embeddings"]
    return float(params["factor"])


def _yarn_inv_freq(cfg: ModelConfig, params: dict) -> np.ndarray:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, linear ramp between."""
    dim, base = cfg.rotary_dim, cfg.rope_theta
    factor = _yarn_factor(cfg, params)
    old_len = params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    keep = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] in float32 for integer positions [B, T]."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    params = cfg.rope_params
    if params.get("rope_type") == "dynamic":
        dim = cfg.rotary_dim
        max_pos = cfg.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        factor = float(params["factor"])
        base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        inv = 1.0 / (base ** exponents)
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = rope_attention_scale(cfg)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first cos.shape[-1] features of x [B, T, H, D] (rotate-half convention)."""
    rot = cos.shape[-1]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out, x_pass], axis=-1) if rot < x.shape[-1] else out


# --------------------------------------------------------------------------- attention
def attention_mask(query_slots, kv_mask, window=None) -> jax.Array:
    """Boolean [B, 1, T, S]: query at slot query_slots[b, t] may attend key slot j (causal, padding and,
    when `window` is given (an int or a traced int32 scalar), sliding window j > slot - window).

    Packed rows: kv_mask may hold segment ids (1, 2, ... one per sequence, 0 for padding); a query in a
    segment then sees only keys of its own segment. With a 0/1 mask this is the plain padding mask.
    A boolean [B, T, S] kv_mask says explicitly which key slots each of the T queries may see (causality
    still applies), e.g. sequences that continue a shared context (`jaxunlearn.evals.scoring.visibility`)."""
    key_slots = jnp.arange(kv_mask.shape[-1])[None, None, :]
    q = query_slots[:, :, None]
    if kv_mask.ndim == 3:
        allowed = (key_slots <= q) & kv_mask.astype(bool)
    else:
        own = jnp.take_along_axis(kv_mask, query_slots, axis=1)[:, :, None]  # the query's segment (0: padding)
        keys = kv_mask[:, None, :]
        allowed = (key_slots <= q) & (keys != 0) & ((keys == own) | (own == 0))
    if window is not None:
        allowed = allowed & (key_slots > q - window)
    return allowed[:, None, :, :]


ATTENTION_BLOCK = 64  # queries per block of `causal_attention` (CPU, scoring 256-slot rows: 64 beat 32 and 128)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array,
                     block: int | None = None) -> jax.Array:
    """Softmax attention of T queries over the keys of the same T slots (no cache: query t at slot t) under
    the boolean mask allowed [B, 1, T, T] (causality included), one block of `block` queries at a time over
    the keys up to that block's last slot only: the blocks above the diagonal, all masked, are never
    computed (10 of 16 blocks of a 256-slot row). The operations of `cached_attention`, in a head-major
    layout: each of q, k and v is transposed once (queries [B, KV, G, T, D], keys and values [B, KV, T, D]),
    so that a block reads a prefix of the slots and both products take their operands as they lie (with keys
    slots-last, XLA copied the keys transposed again for every block: scoring 256-slot rows took 14% more
    CPU time, the MOX step 6% more).
    q [B, T, H, D], k and v [B, T, KV, D]; returns [B, T, H, D]. `block` defaults to ATTENTION_BLOCK, read
    when traced."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    block = block or ATTENTION_BLOCK
    queries = jnp.transpose(q.reshape(b, t, kv, h // kv, d), (0, 2, 3, 1, 4))
    keys, values = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    queries, keys, precision = score_operands(queries, keys)
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        scores = jnp.einsum("bkgtd,bksd->bkgts", queries[:, :, :, start:stop], keys[:, :, :stop],
                            precision=precision, preferred_element_type=jnp.float32)
        probs = masked_softmax(scores, allowed[:, :, None, start:stop, :stop], d).astype(values.dtype)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs, values[:, :, :stop]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)


def score_operands(queries: jax.Array, keys: jax.Array):
    """(queries, keys, precision) for the attention scores' product with float32 results: 16-bit operands
    keep their dtype with a 16-bit x 16-bit -> float32 algorithm, except on CPU, where XLA runs no batched
    16-bit product and float32 operands give the same (exact) products, summed in float32."""
    precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                 jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(queries.dtype))
    if precision is not None and jax.default_backend() == "cpu":
        return queries.astype(jnp.float32), keys.astype(jnp.float32), None
    return queries, keys, precision


def masked_softmax(scores: jax.Array, allowed: jax.Array, head_dim: int) -> jax.Array:
    """float32 softmax over the last axis of scores / sqrt(head_dim), where `allowed` (broadcast) is False
    the score replaced by a large negative number (a row with nothing allowed gets uniform weights)."""
    scores = scores * jnp.float32(1.0 / math.sqrt(head_dim))
    scores = jnp.where(allowed, scores, jnp.float32(-0.7 * np.finfo(np.float32).max))
    return jax.nn.softmax(scores, axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rng, dtype, param_dtype):
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        common = dict(rng=rng, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Dense((e,), (h, d), ("embed",), ("heads", "head_dim"), bias=cfg.qkv_bias, **common)
        self.k_proj = Dense((e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), bias=cfg.qkv_bias, **common)
        self.v_proj = Dense((e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), bias=cfg.qkv_bias, **common)
        self.o_proj = Dense((h, d), (e,), ("heads", "head_dim"), ("embed",), bias=cfg.o_bias, **common)
        if cfg.qk_layernorm:  # Phi option: LayerNorm over each head's features before rotary
            norm = dict(dtype=dtype, param_dtype=param_dtype, axis="head_dim")
            self.q_layernorm = LayerNorm(d, cfg.norm_eps, **norm)
            self.k_layernorm = LayerNorm(d, cfg.norm_eps, **norm)
        else:
            self.q_layernorm = self.k_layernorm = None
        self.implementation = cfg.attention
        self.dtype = dtype

    def __call__(self, x, cos, sin, query_slots, kv_mask, window=None, cache=None, cache_index=None):
        q, k = self.q_proj(x), self.k_proj(x)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q = checkpoint_name(constrain(apply_rope(q, cos, sin), ACT_HEADS), "query_proj")
        k = checkpoint_name(constrain(apply_rope(k, cos, sin), ACT_KV_HEADS), "key_proj")
        v = checkpoint_name(constrain(self.v_proj(x), ACT_KV_HEADS), "value_proj")
        implementation = self.implementation
        if cache is not None:
            cache = write_cache(cache, k, v, cache_index)
            out = cached_attention(q, cache["key"].astype(self.dtype), cache["value"].astype(self.dtype),
                                   attention_mask(query_slots, kv_mask, window))
            return checkpoint_name(self.o_proj(out), "out_proj"), cache
        if implementation == "cudnn" and jax.default_backend() != "gpu":
            raise ModelConfigError(f"attention 'cudnn' needs an NVIDIA GPU (backend is {jax.default_backend()!r}); "
                                   "use attention 'xla'")
        # Grouped-query attention: fewer key/value heads than query heads, the queries grouped (keys and
        # values are never repeated).
        mask = attention_mask(query_slots, kv_mask, window)
        if implementation == "xla":
            out = causal_attention(q, k, v, mask)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
        return checkpoint_name(self.o_proj(out), "out_proj"), None


class MLP(nnx.Module):
    """Gated SiLU MLP (Llama family): down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rng, dtype, param_dtype):
        e, f = cfg.hidden_size, cfg.intermediate_size
        common = dict(bias=cfg.mlp_bias, rng=rng, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Dense((e,), (f,), ("embed",), ("mlp",), **common)
        self.up_proj = Dense((e,), (f,), ("embed",), ("mlp",), **common)
        self.down_proj = Dense((f,), (e,), ("mlp",), ("embed",), **common)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x):
        # on one CPU device the activation reads the gate product's float32 accumulator: no 16-bit
        # result rounded and converted back for it (converts were a third of the bf16 CPU step)
        gate = activation(self.hidden_act)(self.gate_proj(x, jnp.float32 if transposes_smaller_operand() else None))
        return self.down_proj(constrain(gate.astype(x.dtype) * self.up_proj(x), ACT_MLP))


class PhiMLP(nnx.Module):
    """Two-layer MLP with biases (Phi): fc2(act(fc1(x)))."""

    def __init__(self, cfg: ModelConfig, *, rng, dtype, param_dtype):
        e, f = cfg.hidden_size, cfg.intermediate_size
        common = dict(bias=cfg.mlp_bias, rng=rng, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense((e,), (f,), ("embed",), ("mlp",), **common)
        self.fc2 = Dense((f,), (e,), ("mlp",), ("embed",), **common)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x):
        return self.fc2(constrain(activation(self.hidden_act)(self.fc1(x)), ACT_MLP))


class DecoderLayer(nnx.Module):
    """Llama: x + attn(norm1 x), then + mlp(norm2 .). Phi (ParallelDecoderLayer): x + attn(norm x) + mlp(norm x)."""

    parallel = False

    def __init__(self, cfg: ModelConfig, *, rng, dtype, param_dtype):
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = _norm(cfg, **common)
        self.self_attn = Attention(cfg, rng=rng, **common)
        if self.parallel:
            self.mlp = PhiMLP(cfg, rng=rng, **common)
        else:
            self.post_attention_layernorm = _norm(cfg, **common)
            self.mlp = MLP(cfg, rng=rng, **common)

    def __call__(self, x, cos, sin, query_slots, kv_mask, window=None, cache=None, cache_index=None):
        h = self.input_layernorm(x)
        attn, cache = self.self_attn(h, cos, sin, query_slots, kv_mask, window, cache, cache_index)
        if self.parallel:
            return constrain(x + attn + self.mlp(h), ACT_EMBED), cache
        x = x + attn
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), ACT_EMBED), cache


class ParallelDecoderLayer(DecoderLayer):
    """Phi's layer: attention and a two-layer MLP side by side on one input norm."""

    parallel = True


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
    """One module of the layers' class whose every parameter is the layers' parameters stacked on a new
    leading axis (logical name "layers", never sharded)."""
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.split(layer)[1] for layer in layers]

    def stack(*variables):
        axes = tuple(variables[0].get_metadata().get("out_sharding") or ())
        value = jnp.stack([v[...] for v in variables])
        return nnx.Param(value, out_sharding=(LAYERS_AXIS, *axes), eager_sharding=False)

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


# scan_layers="auto": layers unrolled in a traced training step on one CPU device up to this depth
AUTO_UNROLL_MAX_LAYERS = 8
_TRAINING = contextvars.ContextVar("jaxunlearn_training_trace", default=False)


@contextlib.contextmanager
def training_trace():
    """Marks the model calls traced inside as those of a training step's differentiated loss (what
    scan_layers="auto" looks at; `train.make_step_fn` sets it around the objective)."""
    token = _TRAINING.set(True)
    try:
        yield
    finally:
        _TRAINING.reset(token)


def scans_layers(cfg: ModelConfig) -> bool:
    """Whether the layers run as a jax.lax.scan: cfg.scan_layers, where "auto" scans except in a
    training step (`training_trace`) on one CPU device with at most AUTO_UNROLL_MAX_LAYERS layers.
    There the scan's stacked per-layer residuals (zero-initialised [L, ...] buffers, their updates
    and copies) cost 12% of the MOX step's CPU time; a forward-only pass (evaluation) keeps the
    scan, which compiles faster and runs as fast."""
    if cfg.scan_layers != "auto":
        return bool(cfg.scan_layers)
    return not (_TRAINING.get() and transposes_smaller_operand() and cfg.num_layers <= AUTO_UNROLL_MAX_LAYERS)


def remat_policy(name: str):
    """The jax.checkpoint policy of a REMAT_POLICIES name (None for "full": save nothing)."""
    policies = jax.checkpoint_policies
    return {
        "full": None,
        "dots": policies.checkpoint_dots,
        "dots_with_no_batch_dims": policies.checkpoint_dots_with_no_batch_dims,
        "save_qkv_proj": policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
        "save_qkv_out_proj": policies.save_only_these_names("query_proj", "key_proj", "value_proj", "out_proj"),
    }[name]


def _window_array(windows: tuple[int | None, ...]) -> jax.Array | None:
    """Per-layer windows as int32 [L] (full-attention layers get a window no sequence reaches), or None when
    no layer has one."""
    if all(w is None for w in windows):
        return None
    return jnp.asarray([np.iinfo(np.int32).max // 2 if w is None else w for w in windows], jnp.int32)


class CausalLM(nnx.Module):
    """Decoder-only causal language model; see the module docstring for the calling conventions."""

    def __init__(self, cfg: ModelConfig, *, rng: NormalSource | None = None, dtype="float32",
                 param_dtype="float32"):
        """rng: source of the normal(0, 1) draws for weights (None: zero weights, for loading targets)."""
        dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Module()
        self.embed_tokens.embedding = _param(rng, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                             param_dtype)
        # built one layer at a time (same random draws as a per-layer model), then stacked
        block = layout_of(cfg).block
        self.layers = stack_layers([block(cfg, rng=rng, dtype=dtype, param_dtype=param_dtype)
                                    for _ in range(cfg.num_layers)])
        self.norm = _norm(cfg, dtype, param_dtype)
        self.lm_head = nnx.Module()  # kernel None when tied to the embedding; bias only where the arch has one
        self.lm_head.kernel = (None if cfg.tie_word_embeddings else
                               _param(rng, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype))
        self.lm_head.bias = (_param(None, (cfg.vocab_size,), ("vocab",), param_dtype, init="zeros")
                             if cfg.lm_head_bias else None)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        """Logits [B, T, V] (float32) for a padded batch; see the module docstring for masks/positions."""
        return self.logits_from_hidden(self.hidden(input_ids, attention_mask, positions))

    def hidden(self, input_ids, attention_mask=None, positions=None, num_layers=None):
        """Final-normed hidden states [B, T, D] (compute dtype), the input of `logits_from_hidden`.

        With `num_layers=k` (0 <= k <= num_layers): the residual stream after the first k decoder
        layers, before any final norm (what RMU steers)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if positions is None:
            if attention_mask.ndim == 3:
                raise ValueError("a [B, T, T] attention mask needs explicit positions")
            positions = default_positions(attention_mask)
        slots = jnp.broadcast_to(jnp.arange(input_ids.shape[1])[None, :], input_ids.shape)
        x, _ = self.forward_hidden(input_ids, positions, slots, attention_mask, num_layers=num_layers)
        return x if num_layers is not None else self.norm(x)

    def forward(self, input_ids, positions, query_slots, kv_mask, cache=None, cache_index=None, layer_states=None):
        """Logits of `forward_hidden` (cached decoding: `make_decode`); returns (logits, new cache or None)."""
        x, new_cache = self.forward_hidden(input_ids, positions, query_slots, kv_mask, cache, cache_index,
                                           layer_states=layer_states)
        return self.logits_from_hidden(self.norm(x)), new_cache

    def forward_hidden(self, input_ids, positions, query_slots, kv_mask, cache=None, cache_index=None,
                       num_layers=None, layer_states=None):
        """Embedding and the first `num_layers` (default: all) decoder layers, no final norm;
        returns (residual stream [B, T, D], new cache or None).

        The layers run as a jax.lax.scan over the stacked layer parameters, or as a Python loop over the
        same parameters (`scans_layers`: config.scan_layers, "auto" by default); each layer under
        jax.checkpoint with `config.remat`'s policy when there is no cache. With a cache (decoding:
        {"key", "value"}, lists of per-layer [B, kv_heads, head_dim, S] arrays) the layers run unrolled,
        each updating its own buffers in place;
        `layer_states` (decoding only) gives each layer's parameters already sliced out of the stack
        (`slice_layers`), so that a decoding loop does not copy them out at every step."""
        cfg = self.config
        n = cfg.num_layers if num_layers is None else int(num_layers)
        if not 0 <= n <= cfg.num_layers:
            raise ValueError(f"num_layers must be in [0, {cfg.num_layers}], got {num_layers}")
        if cache is not None and n != cfg.num_layers:
            raise ValueError("a KV cache needs every layer (num_layers=None)")
        # the table as its logical axes say: vocab-sharded over fsdp x tensor where the vocabulary divides
        # (each device looks up its rows, never the whole table), else its features gathered (as FSDP does
        # for every weight); either way the lookup and its gradient stay batch-sharded like the activations
        table = constrain(self.embed_tokens.embedding[...], ("vocab", "act_embed"))
        x = constrain(jnp.take(table, input_ids, axis=0).astype(self.dtype), ACT_EMBED)
        cos, sin = rope_tables(cfg, positions)
        graphdef, state = nnx.split(self.layers)
        windows = _window_array(cfg.layer_windows)
        xs = (state, windows)
        if n < cfg.num_layers:
            xs = jax.tree.map(lambda a: a[:n], xs)

        def body(x, layer_xs, layer_cache=None):
            layer_state, window = layer_xs
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, cos, sin, query_slots, kv_mask, window, layer_cache, cache_index)

        if n == 0:
            return x, cache
        if cache is not None:
            # decoding: the layers unrolled, each with its own cache buffers updated in place (slicing one
            # layer out of a cache stacked over layers copies it, for every layer at every step)
            new_cache = {"key": [], "value": []}
            for i in range(n):
                layer_state = jax.tree.map(lambda a: a[i], state) if layer_states is None else layer_states[i]
                x, layer_cache = body(x, (layer_state, None if windows is None else windows[i]),
                                      {"key": cache["key"][i], "value": cache["value"][i]})
                new_cache["key"].append(layer_cache["key"])
                new_cache["value"].append(layer_cache["value"])
            return x, new_cache
        scan = scans_layers(cfg)
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(cfg.remat), prevent_cse=not scan)
        if scan:
            return jax.lax.scan(lambda x, layer_xs: (body(x, layer_xs)[0], None), x, xs)[0], None
        for i in range(n):
            x, _ = body(x, jax.tree.map(lambda a: a[i], xs))
        return x, None

    def logits_from_hidden(self, x):
        """Logits (float32) from final-normed hidden states of any leading shape [..., D]."""
        if self.lm_head.kernel is None:
            kernel = self.embed_tokens.embedding[...].astype(self.dtype).T
        else:
            kernel = self.lm_head.kernel[...].astype(self.dtype)
        logits = contract(x.astype(self.dtype), kernel, 1, jnp.float32)
        if self.lm_head.bias is not None:
            logits = logits + self.lm_head.bias[...].astype(jnp.float32)
        return constrain(logits, ACT_VOCAB) if logits.ndim == 3 else logits


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """cumsum(mask) - 1 clipped at 0: real tokens numbered from 0 in each row, whatever the padding side."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# --------------------------------------------------------------------------- functional API
def init_model(cfg: ModelConfig, seed: int = 0, dtype="float32", param_dtype="float32") -> CausalLM:
    """A randomly initialised model: normal(0, 0.02) weights, unit norm scales, zero biases.

    All weights are consecutive slices of one `jax.random.normal(jax.random.key(seed), (n,))` draw in
    construction order (embedding, then layer 0's weights, layer 1's, ..., then the head), so init is one
    random op, works eagerly and under jit/eval_shape, and is bit-reproducible for a given (config, seed).
    """

    def build(rng):
        return CausalLM(cfg, rng=rng, dtype=dtype, param_dtype=param_dtype)

    counter = NormalSource()
    nnx.eval_shape(lambda: build(counter))
    flat = jax.random.normal(jax.random.key(seed), (counter.count,), jnp.float32)
    return build(NormalSource(flat))


def split_params(model: CausalLM):
    """(graphdef, params): params is an nnx.State holding every nnx.Param of the model."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def merge_params(graphdef, params) -> CausalLM:
    """Rebuild a CausalLM from split_params' output."""
    return nnx.merge(graphdef, params)


class Apply:
    """The pure model functions of one graphdef (what objectives and scoring receive as `apply`).

    apply(params, input_ids, attention_mask=None, positions=None) -> logits [B, T, V] float32
    apply.hidden(params, input_ids, attention_mask=None, positions=None, num_layers=None)
        -> final-normed hidden states [B, T, D]; with num_layers=k the residual stream after k layers
    apply.head(params, hidden) -> logits float32 for hidden states of any leading shape [..., D]

    `apply(p, ids, m) == apply.head(p, apply.hidden(p, ids, m))`; losses over the vocabulary use
    hidden + head to compute logits one sequence chunk at a time (objectives/common.per_token).

    With a `mesh`, the functions trace under it, so the model pins its activations' shardings
    (jaxunlearn.sharding.constrain: batch over ("data", "fsdp")); without one nothing is pinned.
    """

    def __init__(self, graphdef, mesh=None):
        self.graphdef = graphdef
        self.mesh = mesh

    def _model(self, params) -> CausalLM:
        return nnx.merge(self.graphdef, params)

    def __call__(self, params, input_ids, attention_mask=None, positions=None):
        with mesh_context(self.mesh):
            return self._model(params)(input_ids, attention_mask, positions)

    def hidden(self, params, input_ids, attention_mask=None, positions=None, num_layers=None):
        with mesh_context(self.mesh):
            return self._model(params).hidden(input_ids, attention_mask, positions, num_layers)

    def head(self, params, hidden):
        with mesh_context(self.mesh):
            return self._model(params).logits_from_hidden(hidden)


def make_apply(graphdef, mesh=None) -> Apply:
    """Pure `apply(params, input_ids, attention_mask=None, positions=None) -> logits [B, T, V]`,
    with `.hidden` and `.head` (see Apply)."""
    return Apply(graphdef, mesh)


def param_logical_axes(model_or_params) -> Any:
    """Logical axis names of every parameter: the params tree with each array replaced by a tuple of names
    from LOGICAL_AXES or None (tuples are leaves for `jax.tree.map(f, params, axes)`; with the axes tree
    first, pass `is_leaf=lambda x: isinstance(x, tuple)`). Layer parameters start with "layers"."""
    params = model_or_params
    if isinstance(model_or_params, nnx.Module):
        _, params = split_params(model_or_params)
    return jax.tree.map(lambda v: v.replace(tuple(v.get_metadata().get("out_sharding") or ())),
                        params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# --------------------------------------------------------------------------- KV cache
def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype="float32") -> dict[str, list[jax.Array]]:
    """Zeroed KV cache {"key", "value"}, each a list of num_layers arrays [B, num_kv_heads, head_dim, max_len]
    (separate buffers: each layer's slots are updated in place and read without slicing a stacked array)."""
    shape = (batch_size, cfg.num_kv_heads, cfg.head_dim, max_len)
    return {name: [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)] for name in ("key", "value")}


def write_cache(cache: dict, k: jax.Array, v: jax.Array, cache_index) -> dict:
    """Write one layer's new keys/values [B, S, kv_heads, head_dim] at slots [cache_index, cache_index + S) of
    its cache {"key", "value"} [B, kv_heads, head_dim, max_len] (in place when the cache is loop-carried).
    Slots are the last axis, the layout both attention products of `cached_attention` read as they are."""
    zero = jnp.zeros((), jnp.int32)
    start = (zero, zero, zero, jnp.asarray(cache_index, jnp.int32))

    def write(buffer, new):
        return jax.lax.dynamic_update_slice(buffer, jnp.transpose(new.astype(buffer.dtype), (0, 2, 3, 1)), start)

    return {"key": write(cache["key"], k), "value": write(cache["value"], v)}


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of queries q [B, T, H, D] over a layer's cache keys/values [B, kv_heads, D, S] (slots last)
    with a boolean mask [B, 1, T, S]; returns [B, T, H, D]. The operations of jax.nn.dot_product_attention's
    "xla" implementation (float32 scores scaled by 1/sqrt(D), masked, float32 softmax, probabilities in the
    values' dtype), but with products that read the cache in its own layout: no transposed view of a whole
    cache, no 5-D grouped einsum. Query head h uses key/value head h // (H // kv_heads), as there."""
    b, t, h, d = q.shape
    kv = keys.shape[1]
    grouped, keys, precision = score_operands(q.reshape(b, t, kv, h // kv, d), keys)
    scores = jnp.einsum("btkgd,bkds->bkgts", grouped, keys, precision=precision,
                        preferred_element_type=jnp.float32)
    probs = masked_softmax(scores, mask[:, :, None], d).astype(values.dtype)
    return jnp.einsum("bkgts,bkds->btkgd", probs, values).reshape(b, t, h, d)


def slice_layers(params) -> list:
    """Each layer's parameters sliced out of the stacked params["layers"] (what `forward_hidden` takes as
    `layer_states`)."""
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    return [jax.tree.map(lambda a: a[i], layers) for i in range(count)]


def make_decode(graphdef, mesh=None) -> Callable:
    """Pure `decode(params, input_ids, positions, kv_mask, cache, cache_index) -> (logits, cache)`, and
    `decode.prepare(params)`: what a decoding loop passes as `params` instead, built once outside the loop.

    On CPU, prepare slices each layer's weights out of the stack once (XLA:CPU does not hoist those
    slices out of a while loop: every step would copy every weight; the slices cost one extra copy of
    the layer weights while the loop runs). Elsewhere it returns params unchanged."""

    def decode(params, input_ids, positions, kv_mask, cache, cache_index):
        params, layer_states = params if isinstance(params, tuple) else (params, None)
        model = nnx.merge(graphdef, params)
        slots = cache_index + jnp.broadcast_to(jnp.arange(input_ids.shape[1])[None, :], input_ids.shape)
        with mesh_context(mesh):
            return model.forward(input_ids, positions, slots, kv_mask, cache, cache_index, layer_states)

    def prepare(params):
        return (params, slice_layers(params)) if jax.default_backend() == "cpu" else params

    decode.prepare = prepare
    return decode
