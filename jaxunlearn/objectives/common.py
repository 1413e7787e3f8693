"""Loss pieces shared by the objectives.

Every quantity over the vocabulary is computed per token through `per_token`, the one place that
turns a batch into logits: objectives never hold a [B, T, V] tensor themselves, so the memory
of a step is decided here (see `per_token`).

Conventions (chosen once, used by every objective):
- Token log-probs are those of the scored (answer) label tokens, shifted like the labels
  (position t predicts labels[t+1]); `token_logps` returns them with their mask, [B, T-1].
- Batch NLL, `reduction="sample"` (MOX's choice, and TOFU's probability/truth-ratio quantity):
  mean over samples of the per-sample length-normalised NLL; samples with no scored token are
  left out. `reduction="token"` (open-unlearning's and HF's training loss): sum of token NLLs
  over the number of scored tokens in the batch. Objectives take it as `nll_reduction`: "token"
  by default for the baselines (as open-unlearning), "sample" for MOX, so that every forget
  sample weighs the same in the memorisation whatever its answer length (see mox.py).
- Sequence log-probability (NPO, DPO) = sum of the answer-token log-probs of a sample.
- KL(p_ref || p_theta) on retain data is computed at every position t whose next token
  (t+1) is a real token by the attention mask, i.e. shifted like the labels; it covers
  prompt and answer positions and excludes padding. It is averaged over all such positions
  of the batch (each position weighs the same). Reference logits are under stop_gradient.
  open-unlearning's KL instead averages over all B*T positions, padding and final position
  included (see terms.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import ops
from jaxunlearn.errors import JaxunlearnError
from jaxunlearn.sharding import batch_shards

# fn(logits [B, C, V] f32, ref_logits [B, C, V] f32 or None, targets [B, C] int, mask [B, C] f32) -> [B, C]
TokenFn = Callable[[jax.Array, "jax.Array | None", jax.Array, jax.Array], jax.Array]


def per_token(apply, params, data, fn: TokenFn, ref_params=None, hidden=None) -> jax.Array:
    """Values [B, T-1] of `fn` at every next-token position of one batch dict.

    fn receives float32 logits at positions 0..T-2 (`ref_logits` the frozen reference's, under
    stop_gradient, when ref_params is given, else None), the next-token targets (labels[:, 1:],
    IGNORE replaced by 0) and the float mask of scored targets; it returns one value per position.

    Memory: when `apply` has `.hidden`/`.head` and a positive `loss_chunk` (see `with_loss_chunk`)
    shorter than the sequence, the model runs once to hidden states and `fn` is evaluated one
    chunk of `loss_chunk` positions at a time under jax.checkpoint, so at most one chunk of
    float32 [B, loss_chunk, V] logits (per model) is alive, in the forward and the backward pass.
    Otherwise (a plain apply function, chunking off, or a short sequence) the full logits are built,
    from hidden states cut to the T-1 predicting positions before the head where `apply` has `.hidden`
    (no [B, T, V] slice copies, forward or backward: -5% CPU time of the 2-core MOX step).
    `hidden`: the model's hidden states of `data`, already computed (see `joint_hidden`).
    """
    ids, mask = data["input_ids"], data["attention_mask"]
    if hidden is None and not chunks_losses(apply, ids.shape[1]):
        return _per_token_full(apply, params, data, fn, ref_params)
    h = apply.hidden(params, ids, mask) if hidden is None else hidden
    ref_h = None if ref_params is None else jax.lax.stop_gradient(apply.hidden(ref_params, ids, mask))
    return _chunked_values(apply.head, params, ref_params, h, ref_h, data["labels"], fn, loss_chunk_of(apply))


def chunks_losses(apply, length: int) -> bool:
    """Whether per_token computes sequences of `length` tokens in chunks (from hidden states)."""
    size = loss_chunk_of(apply)
    return 0 < size < length - 1 and hasattr(apply, "hidden")


def joint_hidden(apply, params, datas) -> list[jax.Array] | None:
    """Hidden states of several batch dicts from ONE pass of the model (rows padded on the right to
    the longest sequence, which changes no earlier position), so that the backward pass runs the
    layers once and builds one parameter gradient instead of one per batch (each a full-size fp32
    copy of the stacked layers). Rows are grouped per batch shard (every shard holds its own rows of
    each batch, nothing moves between devices). None when per_token would not chunk (then each
    batch takes its own pass) or a batch does not split over the shards."""
    length = max(d["input_ids"].shape[1] for d in datas)
    if not all(chunks_losses(apply, d["input_ids"].shape[1]) for d in datas):
        return None
    mesh = getattr(apply, "mesh", None)
    n = 1 if mesh is None else batch_shards(mesh)
    sizes = [d["input_ids"].shape[0] for d in datas]
    if any(b % n for b in sizes):
        return None

    def joined(key):
        parts = [jnp.pad(d[key], ((0, 0), (0, length - d[key].shape[1]))) for d in datas]
        parts = [x.reshape(n, x.shape[0] // n, length) for x in parts]
        return jnp.concatenate(parts, axis=1).reshape(-1, length)

    h = apply.hidden(params, joined("input_ids"), joined("attention_mask"))
    h = h.reshape(n, -1, *h.shape[1:])
    bounds = np.cumsum([0] + [b // n for b in sizes])
    return [h[:, lo:hi, : d["input_ids"].shape[1]].reshape(-1, d["input_ids"].shape[1], h.shape[-1])
            for lo, hi, d in zip(bounds[:-1], bounds[1:], datas)]


def _per_token_full(apply, params, data, fn: TokenFn, ref_params) -> jax.Array:
    """per_token with the full [B, T-1, V] logits of both models."""

    def logits_of(p):  # the last position predicts nothing: hidden states cut before the head when possible
        ids, mask = data["input_ids"], data["attention_mask"]
        if hasattr(apply, "hidden"):
            return apply.head(p, apply.hidden(p, ids, mask)[:, :-1]).astype(jnp.float32)
        return apply(p, ids, mask)[:, :-1].astype(jnp.float32)

    ref_logits = None if ref_params is None else jax.lax.stop_gradient(logits_of(ref_params))
    return fn(logits_of(params), ref_logits, *ops.next_targets(data["labels"]))


def _chunked_values(head, params, ref_params, h, ref_h, labels, fn: TokenFn, size: int) -> jax.Array:
    """fn over sequence chunks of `size` positions of hidden states h [B, T, D] -> [B, T-1].

    Position t is scored against labels[t+1]; the last position (no next token) and the padding
    up to a multiple of `size` get target 0 with mask 0 and are dropped from the result.
    """
    b, t = labels.shape
    n = -(-t // size)
    pad = n * size - t
    targets = jnp.pad(labels[:, 1:], ((0, 0), (0, 1 + pad)), constant_values=ops.IGNORE)
    mask = (targets != ops.IGNORE).astype(jnp.float32)
    targets = jnp.where(targets == ops.IGNORE, 0, targets)

    def chunks(x):  # [B, T', ...] -> [n, B, size, ...]
        x = jnp.pad(x, ((0, 0), (0, n * size - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one_chunk(params, ref_params, h_c, ref_c, t_c, m_c):
        ref_logits = None
        if ref_c is not None:
            ref_logits = jax.lax.stop_gradient(head(ref_params, ref_c)).astype(jnp.float32)
        return fn(head(params, h_c).astype(jnp.float32), ref_logits, t_c, m_c)

    xs = (chunks(h), None if ref_h is None else chunks(ref_h), chunks(targets), chunks(mask))
    values = jax.lax.map(lambda x: one_chunk(params, ref_params, *x), xs)  # [n, B, size]
    return jnp.moveaxis(values, 0, 1).reshape(b, n * size)[:, : t - 1]


def loss_chunk_of(apply) -> int:
    """Sequence chunk size per_token uses with `apply` (0 = full logits)."""
    return int(getattr(apply, "loss_chunk", 0) or 0)


class ChunkedApply:
    """An `apply` (see models.Apply) whose vocabulary losses per_token computes in chunks of
    `loss_chunk` positions; every other attribute (hidden, head, mesh, graphdef) is the wrapped one's."""

    def __init__(self, apply, loss_chunk: int):
        self.apply = apply
        self.loss_chunk = int(loss_chunk)

    def __call__(self, *args, **kwargs):
        return self.apply(*args, **kwargs)

    def __getattr__(self, name):
        if name == "apply":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.apply, name)


def with_loss_chunk(apply, loss_chunk: int):
    """`apply` with per_token's chunk size (0 = full logits); replaces an earlier setting."""
    return ChunkedApply(apply.apply if isinstance(apply, ChunkedApply) else apply, loss_chunk)


def label_logp(logits: jax.Array, ref_logits, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """TokenFn: log p(target) under `logits`, 0 where the target is not scored."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    return (picked_logit(logits, targets) - logz) * mask


def picked_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits[..., targets] as a masked sum over the vocabulary (elementwise and a reduction, so that
    vocab-sharded logits are reduced where they lie instead of being gathered for an indexed read)."""
    hit = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    return jnp.where(hit, logits, 0.0).sum(-1)


def kl_to_model(logits: jax.Array, ref_logits: jax.Array, targets, mask) -> jax.Array:
    """TokenFn: KL(p_ref || p_theta) at each position (every position; masking is the caller's)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    logq = jax.nn.log_softmax(ref_logits, axis=-1)
    return (jnp.exp(logq) * (logq - logp)).sum(-1)


def label_mask(data) -> jax.Array:
    """[B, T-1] float mask of scored next-token targets."""
    return ops.next_targets(data["labels"])[1]


def next_real_mask(data) -> jax.Array:
    """[B, T-1] float mask of positions whose next token is real (the KL positions)."""
    return (data["attention_mask"][:, 1:] > 0).astype(jnp.float32)


def token_logps(apply, params, data, hidden=None) -> tuple[jax.Array, jax.Array]:
    """(log p(label) [B, T-1], scored mask [B, T-1]) of the model `params`."""
    return per_token(apply, params, data, label_logp, hidden=hidden), label_mask(data)


def ref_token_logps(apply, ref_params, data) -> tuple[jax.Array, jax.Array]:
    """token_logps of the frozen reference, never differentiated."""
    return jax.lax.stop_gradient(per_token(apply, ref_params, data, label_logp)), label_mask(data)


def token_kl(apply, params, ref_params, data, hidden=None) -> tuple[jax.Array, jax.Array]:
    """(KL(p_ref || p_theta) [B, T-1], mask of positions whose next token is real)."""
    return per_token(apply, params, data, kl_to_model, ref_params=ref_params, hidden=hidden), next_real_mask(data)


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(values * weights) / max(sum(weights), 1)."""
    weights = weights.astype(jnp.float32)
    return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def sequence_sums(logp: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample summed log-prob [B] and number of scored tokens [B]."""
    return (logp * mask).sum(-1), mask.sum(-1)


def nll_from_logps(logp: jax.Array, mask: jax.Array, reduction: str = "sample") -> jax.Array:
    """Batch NLL from token log-probs: reduction "sample" (mean of per-sample means) or "token"."""
    return nll_from_sums(*sequence_sums(logp, mask), reduction)


def nll_from_sums(total: jax.Array, count: jax.Array, reduction: str = "sample") -> jax.Array:
    """Batch NLL from per-sample summed log-probs [B] and scored-token counts [B] (see nll_from_logps)."""
    if reduction == "sample":
        return masked_mean(-total / jnp.maximum(count, 1.0), count > 0)
    if reduction == "token":
        return -total.sum() / jnp.maximum(count.sum(), 1.0)
    raise ValueError(f"nll reduction: expected 'sample' or 'token', got {reduction!r}")


def batch_nll(apply, params, data, reduction: str = "sample", hidden=None) -> jax.Array:
    """Batch NLL of the scored tokens of `data` (see the module docstring for the reductions)."""
    return nll_from_logps(*token_logps(apply, params, data, hidden), reduction)


def sequence_logprob(apply, params, data, hidden=None) -> tuple[jax.Array, jax.Array]:
    """Per-sample summed answer log-prob [B] and a [B] mask of samples with scored tokens."""
    total, count = sequence_sums(*token_logps(apply, params, data, hidden))
    return total, count > 0


def log_ratio_to_ref(params, ref_params, batch, apply, hidden=None) -> tuple[jax.Array, jax.Array]:
    """Per-sample logp_theta(y|x) - logp_ref(y|x) (summed answer log-probs) [B] and the valid-sample mask [B]."""
    logp, valid = sequence_logprob(apply, params, batch, hidden)
    ref_logp, _ = sequence_sums(*ref_token_logps(apply, ref_params, batch))
    return logp - ref_logp, valid


def retain_kl(apply, params, ref_params, data, hidden=None) -> jax.Array:
    """Mean per-position KL(p_ref || p_theta) over positions whose next token is real."""
    return masked_mean(*token_kl(apply, params, ref_params, data, hidden))


# ------------------------------------------------------------------ logits-level helpers (tests, evaluation)


def mean_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch NLL from full logits: mean over samples (with >= 1 scored token) of per-sample mean token NLL."""
    total, count = ops.sequence_nll(logits, labels)
    return masked_mean(total / jnp.maximum(count, 1.0), count > 0)


class MissingBatchKeyError(JaxunlearnError, ValueError):
    """The batch lacks a split the objective needs."""


def require(batch, key: str, objective: str):
    """batch[key], or a one-line error saying which objective needs which key."""
    if key not in batch:
        raise MissingBatchKeyError(f"objective {objective!r} needs batch[{key!r}]; batch has keys {sorted(batch)}")
    return batch[key]
