"""Loss pieces shared by the objectives, built on jaxunlearn.ops.

Conventions (chosen once, used by every objective):
- NLL of a batch = mean over samples of the per-sample length-normalised NLL of the scored
  (answer) tokens, the quantity TOFU's probability and truth-ratio metrics are built on.
  Samples with no scored token are left out of the mean.
- Sequence log-probability (NPO) = sum of the answer-token log-probs of a sample.
- KL(p_ref || p_theta) on retain data is computed at every position t whose next token
  (t+1) is a real token by the attention mask, i.e. shifted like the labels; it covers
  prompt and answer positions and excludes padding. It is averaged over all such positions
  of the batch (each position weighs the same). Reference logits are under stop_gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxunlearn import ops


def logits_of(apply, params, batch) -> jax.Array:
    """Run the model on one batch dict (input_ids, attention_mask)."""
    return apply(params, batch["input_ids"], batch["attention_mask"])


def ref_logits_of(apply, ref_params, batch) -> jax.Array:
    """Reference-model logits, never differentiated."""
    return jax.lax.stop_gradient(apply(ref_params, batch["input_ids"], batch["attention_mask"]))


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(values * weights) / max(sum(weights), 1)."""
    weights = weights.astype(jnp.float32)
    return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def mean_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch NLL: mean over samples (with >= 1 scored token) of per-sample mean token NLL."""
    total, count = ops.sequence_nll(logits, labels)
    per_sample = total / jnp.maximum(count, 1.0)
    return masked_mean(per_sample, count > 0)


def token_mean_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch NLL averaged over all scored tokens (the usual language-model training loss)."""
    total, count = ops.sequence_nll(logits, labels)
    return total.sum() / jnp.maximum(count.sum(), 1.0)


def sequence_logprob(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample summed answer log-prob [B] and a [B] mask of samples with scored tokens."""
    total, count = ops.sequence_nll(logits, labels)
    return -total, count > 0


def log_ratio_to_ref(params, ref_params, batch, apply) -> tuple[jax.Array, jax.Array]:
    """Per-sample logp_theta(y|x) - logp_ref(y|x) (summed answer log-probs) [B] and the valid-sample mask [B]."""
    logp, valid = sequence_logprob(logits_of(apply, params, batch), batch["labels"])
    ref_logp, _ = sequence_logprob(ref_logits_of(apply, ref_params, batch), batch["labels"])
    return logp - ref_logp, valid


def kl_ref_to_model(logits: jax.Array, ref_logits: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean per-position KL(p_ref || p_theta) over positions whose next token is real."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(ref_logits[:, :-1].astype(jnp.float32), axis=-1)
    kl = (jnp.exp(logq) * (logq - logp)).sum(-1)
    return masked_mean(kl, attention_mask[:, 1:] > 0)


class MissingBatchKeyError(ValueError):
    """The batch lacks a split the objective needs."""


def require(batch, key: str, objective: str):
    """batch[key], or a one-line error saying which objective needs which key."""
    if key not in batch:
        raise MissingBatchKeyError(f"objective {objective!r} needs batch[{key!r}]; batch has keys {sorted(batch)}")
    return batch[key]
