"""Jitted teacher-forced scoring of encoded QA examples.

`make_score_fn(apply, ...)` jits one function (compiled once per batch shape, i.e. per bucket)
that maps a right-padded batch (ops.py convention) to per-token arrays [B, T-1]:
  logp   log p(label_t) of each scored token (0 where not scored)
  z      Min-K%++ standardised log-prob (log p(x_t) - mu_t) / sigma_t, with mu_t, sigma_t the mean
         and standard deviation of log p under the model's own next-token distribution at t
  match  1 where the argmax of the next-token logits equals the label
  mask   1 where the label is scored

`score_examples` runs it over a list of encoded examples (dict input_ids, labels): examples are
sorted by length so that each batch uses the smallest bucket, the last batch is filled up with
copies of its first row (their results are dropped), and results come back in input order as
`SampleScore`s holding the scored-token arrays and the summed NLL.

Sharding: pass `param_shardings` (a pytree of shardings matching params) and `batch_sharding`
(a sharding for [B, T] arrays, split over the batch axis) to place the computation on a mesh;
the batch size must then be a multiple of the number of batch shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.ops import shift_labels

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class SampleScore:
    """Teacher-forced results for one example, over its scored tokens only."""

    logp: np.ndarray  # [n] float32 log-probabilities of the label tokens
    z: np.ndarray  # [n] Min-K%++ standardised log-probabilities
    match: np.ndarray  # [n] bool, argmax == label

    @property
    def count(self) -> int:
        return int(self.logp.size)

    @property
    def nll_sum(self) -> float:
        return float(-self.logp.astype(np.float64).sum())

    @property
    def mean_nll(self) -> float:
        """Length-normalised NLL (the TOFU 'avg loss'); nan for an example with no scored token."""
        return self.nll_sum / self.count if self.count else float("nan")


def token_stats(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per-token logp, z, match and mask [B, T-1] from logits [B, T, V] and aligned labels [B, T].

    One max and one exp pass over the vocabulary: with d = logits - max and Z = sum exp(d),
    log q = d - log Z, so mu = E_q[d] - log Z and var = E_q[d^2] - E_q[d]^2 (the variance of log q).
    """
    shifted, targets, mask = shift_labels(logits, labels)
    x = shifted.astype(jnp.float32)
    top = jnp.max(x, axis=-1, keepdims=True)
    d = x - top
    e = jnp.exp(d)
    total = jnp.sum(e, axis=-1)
    mean_d = jnp.sum(e * d, axis=-1) / total
    mean_d2 = jnp.sum(e * jnp.square(d), axis=-1) / total
    log_total = jnp.log(total)
    picked = jnp.take_along_axis(d, targets[..., None], axis=-1)[..., 0]
    logp = (picked - log_total) * mask
    mu = mean_d - log_total
    sigma = jnp.sqrt(jnp.maximum(mean_d2 - jnp.square(mean_d), 1e-12))
    z = (logp - mu) / sigma * mask
    match = (jnp.argmax(x, axis=-1) == targets).astype(jnp.float32) * mask
    return {"logp": logp, "z": z, "match": match, "mask": mask}


def make_score_fn(
    apply: Callable,
    param_shardings: Any = None,
    batch_sharding: Any = None,
) -> Callable:
    """Jitted score(params, batch) -> dict of [B, T-1] arrays (see module docstring)."""

    def score(params, batch):
        logits = apply(params, batch["input_ids"], batch["attention_mask"])
        return token_stats(logits, batch["labels"])

    if batch_sharding is None:
        return jax.jit(score)
    batch_in = {k: batch_sharding for k in BATCH_KEYS}
    return jax.jit(score, in_shardings=(param_shardings, batch_in), out_shardings=batch_sharding)


def batch_order(lengths: Sequence[int]) -> np.ndarray:
    """Indices sorted by length (stable), so batches of neighbours share a bucket."""
    return np.argsort(np.asarray(lengths), kind="stable")


def fill_rows(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Fill a batch up to batch_size rows with copies of row 0 (results for them are dropped)."""
    n = next(iter(batch.values())).shape[0]
    if n > batch_size:
        raise ValueError(f"batch has {n} rows, more than batch_size={batch_size}")
    if n == batch_size:
        return dict(batch)
    idx = np.concatenate([np.arange(n), np.zeros(batch_size - n, dtype=np.int64)])
    return {k: v[idx] for k, v in batch.items()}


def iter_batches(examples: Sequence[Mapping], batch_size: int, pad_id: int, buckets: Sequence[int]):
    """Yield (indices, collated batch filled to batch_size) over examples sorted by length."""
    from jaxunlearn.data.batching import collate

    order = batch_order([len(e["input_ids"]) for e in examples])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([examples[i] for i in idx], pad_id, buckets)
        yield idx, fill_rows(batch, batch_size)


def place_batch(batch: Mapping[str, np.ndarray], batch_sharding: Any = None) -> dict:
    """Host batch -> device arrays: default placement, or split by `batch_sharding`.

    With several processes every host holds the same global batch; each contributes its own rows
    (`jaxunlearn.data.host_slice`) to one global array (`to_global`).
    """
    if batch_sharding is None:
        return {k: jax.device_put(v) for k, v in batch.items()}  # (jnp.asarray would compile a program per shape)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
    from jaxunlearn.data import host_slice, to_global

    return to_global(host_slice(dict(batch)), batch_sharding)


def fetch(tree: Any) -> Any:
    """Device results -> numpy on every host (all-gathered across processes when there are several)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def score_examples(
    score_fn: Callable,
    params: Any,
    examples: Sequence[Mapping],
    batch_size: int,
    pad_id: int,
    buckets: Sequence[int],
    batch_sharding: Any = None,
) -> list[SampleScore]:
    """Teacher-forced SampleScore per example, in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[SampleScore | None] = [None] * len(examples)
    pending = []
    for idx, batch in iter_batches(examples, batch_size, pad_id, buckets):
        batch = {k: batch[k] for k in BATCH_KEYS}
        pending.append((idx, score_fn(params, place_batch(batch, batch_sharding))))
    for idx, res in pending:  # dispatch everything first, then read back
        host = fetch(res)
        for row, i in enumerate(idx):
            keep = host["mask"][row] > 0
            out[i] = SampleScore(
                logp=host["logp"][row][keep],
                z=host["z"][row][keep],
                match=host["match"][row][keep] > 0,
            )
    return out  # type: ignore[return-value]
