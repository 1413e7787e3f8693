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

from jaxunlearn import ops
from jaxunlearn.errors import JaxunlearnError

# fn(logits [B, C, V] f32, ref_logits [B, C, V] f32 or None, targets [B, C] int, mask [B, C] f32) -> [B, C]
TokenFn = Callable[[jax.Array, "jax.Array | None", jax.Array, jax.Array], jax.Array]


def per_token(apply, params, data, fn: TokenFn, ref_params=None) -> jax.Array:
    """Values [B, T-1] of `fn` at every next-token position of one batch dict.

    fn receives float32 logits at positions 0..T-2 (`ref_logits` the frozen reference's, under
    stop_gradient, when ref_params is given, else None), the next-token targets (labels[:, 1:],
    IGNORE replaced by 0) and the float mask of scored targets; it returns one value per position.
    """
    logits = apply(params, data["input_ids"], data["attention_mask"])
    ref_logits = None
    if ref_params is not None:
        ref_logits = jax.lax.stop_gradient(apply(ref_params, data["input_ids"], data["attention_mask"]))
        ref_logits = ref_logits[:, :-1].astype(jnp.float32)
    logits, targets, mask = ops.shift_labels(logits, data["labels"])
    return fn(logits.astype(jnp.float32), ref_logits, targets, mask)


def label_logp(logits: jax.Array, ref_logits, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """TokenFn: log p(target) under `logits`, 0 where the target is not scored."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (picked - logz) * mask


def kl_to_model(logits: jax.Array, ref_logits: jax.Array, targets, mask) -> jax.Array:
    """TokenFn: KL(p_ref || p_theta) at each position (every position; masking is the caller's)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    logq = jax.nn.log_softmax(ref_logits, axis=-1)
    return (jnp.exp(logq) * (logq - logp)).sum(-1)


def label_mask(data) -> jax.Array:
    """[B, T-1] float mask of scored next-token targets."""
    return (data["labels"][:, 1:] != ops.IGNORE).astype(jnp.float32)


def next_real_mask(data) -> jax.Array:
    """[B, T-1] float mask of positions whose next token is real (the KL positions)."""
    return (data["attention_mask"][:, 1:] > 0).astype(jnp.float32)


def token_logps(apply, params, data) -> tuple[jax.Array, jax.Array]:
    """(log p(label) [B, T-1], scored mask [B, T-1]) of the model `params`."""
    return per_token(apply, params, data, label_logp), label_mask(data)


def ref_token_logps(apply, ref_params, data) -> tuple[jax.Array, jax.Array]:
    """token_logps of the frozen reference, never differentiated."""
    return jax.lax.stop_gradient(per_token(apply, ref_params, data, label_logp)), label_mask(data)


def token_kl(apply, params, ref_params, data) -> tuple[jax.Array, jax.Array]:
    """(KL(p_ref || p_theta) [B, T-1], mask of positions whose next token is real)."""
    return per_token(apply, params, data, kl_to_model, ref_params=ref_params), next_real_mask(data)


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


def batch_nll(apply, params, data, reduction: str = "sample") -> jax.Array:
    """Batch NLL of the scored tokens of `data` (see the module docstring for the reductions)."""
    return nll_from_logps(*token_logps(apply, params, data), reduction)


def sequence_logprob(apply, params, data) -> tuple[jax.Array, jax.Array]:
    """Per-sample summed answer log-prob [B] and a [B] mask of samples with scored tokens."""
    total, count = sequence_sums(*token_logps(apply, params, data))
    return total, count > 0


def log_ratio_to_ref(params, ref_params, batch, apply) -> tuple[jax.Array, jax.Array]:
    """Per-sample logp_theta(y|x) - logp_ref(y|x) (summed answer log-probs) [B] and the valid-sample mask [B]."""
    logp, valid = sequence_logprob(apply, params, batch)
    ref_logp, _ = sequence_sums(*ref_token_logps(apply, ref_params, batch))
    return logp - ref_logp, valid


def retain_kl(apply, params, ref_params, data) -> jax.Array:
    """Mean per-position KL(p_ref || p_theta) over positions whose next token is real."""
    return masked_mean(*token_kl(apply, params, ref_params, data))


# ------------------------------------------------------------------ logits-level helpers (tests, evaluation)


def logits_of(apply, params, batch) -> jax.Array:
    """Run the model on one batch dict (input_ids, attention_mask): full [B, T, V] logits."""
    return apply(params, batch["input_ids"], batch["attention_mask"])


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
