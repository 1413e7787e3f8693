"""Token-level quantities shared by objectives and evaluation.

Batch convention (used everywhere in jaxunlearn):
  input_ids       int32 [B, T]
  attention_mask  int32 [B, T]  1 for real tokens, 0 for padding
  labels          int32 [B, T]  the token to score at that position, or IGNORE (-100);
                  aligned with input_ids (HF convention): logits at t predict labels at t+1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100


def next_targets(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets labels[:, 1:] with IGNORE replaced by 0, float mask of scored targets): what positions
    0..T-2 predict."""
    targets = labels[:, 1:]
    return jnp.where(targets == IGNORE, 0, targets), (targets != IGNORE).astype(jnp.float32)


def first_argmax(x: jax.Array, largest: jax.Array | None = None) -> jax.Array:
    """int32 index of the largest value along the last axis, the first one on ties, the first NaN if any:
    jnp.argmax's answer, as a max and a min (XLA:CPU runs argmax's (value, index) reduction 6x slower).
    `largest`: jnp.max(x, axis=-1, keepdims=True) when the caller has it already."""
    largest = jnp.max(x, axis=-1, keepdims=True) if largest is None else largest
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = (x == largest) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def shift_labels(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Align next-token logits with their targets.

    Returns (logits[:, :-1], targets[:, 1:] with IGNORE replaced by 0, float mask of scored targets).
    """
    return (logits[:, :-1], *next_targets(labels))


def token_logprobs(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probability of each scored label token, computed in float32.

    Returns (logp [B, T-1], mask [B, T-1]); logp is 0 where mask is 0.
    """
    logits, targets, mask = shift_labels(logits, labels)
    logz = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logits.astype(jnp.float32), targets[..., None], axis=-1)[..., 0]
    return (picked - logz) * mask, mask


def sequence_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample summed NLL over scored tokens and the number of scored tokens: ([B], [B])."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum(-1), mask.sum(-1)


def mean_sequence_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample length-normalised NLL [B] (0 for a sample with no scored token)."""
    total, count = sequence_nll(logits, labels)
    return total / jnp.maximum(count, 1.0)
