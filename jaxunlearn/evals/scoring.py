"""Jitted teacher-forced scoring of encoded QA examples.

`make_score_fn(apply, ...)` jits one function (compiled once per batch shape)
that maps a batch of packed rows (`collate_packed`) to arrays [B, T-1] over each row's scored tokens,
in order, left-aligned (row b's first score_count[b] entries; 0 after them):
  logp   log p(label) of each scored token
  z      Min-K%++ standardised log-prob (log p(x_t) - mu_t) / sigma_t, with mu_t, sigma_t the mean
         and standard deviation of log p under the model's own next-token distribution at t
  match  1 where the argmax of the next-token logits equals the label
The model runs over every position, but the vocabulary projection (LM head) and the statistics over
the vocabulary only over the scored ones (an answer is often less than half of its padded row).

`score_examples` runs it over a list of encoded examples (dict input_ids, labels): examples are packed
side by side into rows of one width (the bucket of the longest; first-fit decreasing, each example
attending only to itself through segment ids in the attention mask and counting its positions from 0),
so one call runs one compiled program with little padding; the last batch is filled up with copies
of its first row (their results are dropped), and results come back in input order as
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

from jaxunlearn.ops import IGNORE

BATCH_KEYS = ("input_ids", "attention_mask", "positions", "labels", "score_index", "score_count")
SCORE_CHUNK = 32  # scored positions per row that one pass of the head and the vocabulary statistics covers


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


def vocab_stats(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logp, z, match) of target tokens under next-token logits [..., V] (any leading shape, targets [...]).

    One max and one exp pass over the vocabulary: with d = logits - max and Z = sum exp(d),
    log q = d - log Z, so mu = E_q[d] - log Z and var = E_q[d^2] - E_q[d]^2 (the variance of log q).
    """
    x = logits.astype(jnp.float32)
    top = jnp.max(x, axis=-1, keepdims=True)
    d = x - top
    e = jnp.exp(d)
    total = jnp.sum(e, axis=-1)
    mean_d = jnp.sum(e * d, axis=-1) / total
    mean_d2 = jnp.sum(e * jnp.square(d), axis=-1) / total
    log_total = jnp.log(total)
    picked = jnp.take_along_axis(d, targets[..., None], axis=-1)[..., 0]
    logp = picked - log_total
    mu = mean_d - log_total
    sigma = jnp.sqrt(jnp.maximum(mean_d2 - jnp.square(mean_d), 1e-12))
    match = (jnp.argmax(x, axis=-1) == targets).astype(jnp.float32)
    return logp, (logp - mu) / sigma, match


def scored_positions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index [B, T-1], count [B]) of right-padded labels [B, T]: row b's positions t whose next label
    labels[b, t + 1] is scored, in order, in index[b, :count[b]] (0 after them)."""
    scored = np.asarray(labels)[:, 1:] != IGNORE
    count = scored.sum(axis=1)
    first = np.argsort(~scored, axis=1, kind="stable")  # scored positions first, each group in order
    index = np.where(np.arange(scored.shape[1])[None, :] < count[:, None], first, 0)
    return index.astype(np.int32), count.astype(np.int32)


def make_score_fn(
    apply: Callable,
    param_shardings: Any = None,
    batch_sharding: Any = None,
    chunk: int = SCORE_CHUNK,
) -> Callable:
    """Jitted score(params, batch) -> {"logp", "z", "match"} [B, T-1] (see module docstring).

    `apply` has `.hidden(params, ids, mask, positions)` (final-normed hidden states; mask holding segment
    ids, each token attending only to its own segment) and `.head(params, hidden)` (logits), as
    `jaxunlearn.models.make_apply` gives. The head and the vocabulary statistics run only at
    the scored positions (batch["score_index"], batch["score_count"] from `scored_positions`), `chunk`
    positions per row at a time, as many chunks as the row with the most scored tokens needs.
    """

    def score(params, batch):
        hidden = apply.hidden(params, batch["input_ids"], batch["attention_mask"], batch["positions"])
        index, count = batch["score_index"], batch["score_count"]
        b, width = index.shape
        padded = -(-width // chunk) * chunk
        targets = jnp.take_along_axis(batch["labels"][:, 1:], index, axis=1)
        valid = jnp.arange(width)[None, :] < count[:, None]
        index = jnp.pad(index, ((0, 0), (0, padded - width)))
        targets = jnp.pad(jnp.where(valid, targets, 0), ((0, 0), (0, padded - width)))

        def body(i, out):
            start = i * chunk
            idx = jax.lax.dynamic_slice_in_dim(index, start, chunk, axis=1)
            h = jnp.take_along_axis(hidden, idx[..., None], axis=1)
            stats = vocab_stats(apply.head(params, h), jax.lax.dynamic_slice_in_dim(targets, start, chunk, axis=1))
            return tuple(jax.lax.dynamic_update_slice_in_dim(o, s, start, axis=1) for o, s in zip(out, stats))

        n_chunks = (jnp.max(count) + chunk - 1) // chunk
        out = jax.lax.fori_loop(0, n_chunks, body, tuple(jnp.zeros((b, padded), jnp.float32) for _ in range(3)))
        mask = valid.astype(jnp.float32)
        return {name: o[:, :width] * mask for name, o in zip(("logp", "z", "match"), out)}

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


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Example indices per row: examples packed first-fit decreasing into rows of at most `width` tokens."""
    free = np.zeros(0, np.int64)
    rows: list[list[int]] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        fits = np.flatnonzero(free >= lengths[i])
        if fits.size:
            free[fits[0]] -= lengths[i]
            rows[fits[0]].append(int(i))
        else:
            free = np.append(free, width - lengths[i])
            rows.append([int(i)])
    return rows


def collate_packed(examples: Sequence[Mapping], rows: Sequence[Sequence[int]], width: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """int32 [R, width] arrays of packed rows (each a list of example indices, side by side, then padding):
    input_ids; attention_mask holding segment ids (1, 2, ... per example, 0 on padding, so that each
    example attends only to itself); positions counted from 0 in each example; labels, IGNORE on each
    example's first token (never a target of the example before it) and on padding."""
    shape = (len(rows), width)
    ids, segments = np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32)
    positions, labels = np.zeros(shape, np.int32), np.full(shape, IGNORE, np.int32)
    for r, row in enumerate(rows):
        at = 0
        for segment, i in enumerate(row, 1):
            e = examples[i]
            n = len(e["input_ids"])
            if len(e["labels"]) != n:
                raise ValueError(f"example {i}: input_ids and labels differ in length ({n} vs {len(e['labels'])})")
            ids[r, at:at + n] = e["input_ids"]
            segments[r, at:at + n] = segment
            positions[r, at:at + n] = np.arange(n)
            labels[r, at + 1:at + n] = e["labels"][1:]
            at += n
    return {"input_ids": ids, "attention_mask": segments, "positions": positions, "labels": labels}


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
    from jaxunlearn.data.batching import bucket_length

    if not examples:
        return []
    lengths = [len(e["input_ids"]) for e in examples]
    width = bucket_length(max(lengths), buckets)
    counts = [sum(t != IGNORE for t in e["labels"][1:]) for e in examples]
    rows = pack_rows(lengths, width)
    out: list[SampleScore | None] = [None] * len(examples)
    pending = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = fill_rows(collate_packed(examples, chunk, width, pad_id), batch_size)
        batch["score_index"], batch["score_count"] = scored_positions(batch["labels"])
        pending.append((chunk, score_fn(params, place_batch(batch, batch_sharding))))
    for chunk, res in pending:  # dispatch everything first, then read back
        host = fetch(res)
        for r, row in enumerate(chunk):
            at = 0
            for i in row:  # the row's scored tokens, example after example
                got = {k: host[k][r, at:at + counts[i]] for k in ("logp", "z", "match")}
                out[i] = SampleScore(logp=got["logp"], z=got["z"], match=got["match"] > 0)
                at += counts[i]
    return out  # type: ignore[return-value]
