"""Jitted teacher-forced scoring of encoded QA examples.

`make_score_fn(apply, ...)` jits one function (compiled once per batch shape)
that maps a batch of packed rows (`collate_rows`) to arrays [B, T-1] over each row's scored tokens,
in order, left-aligned (row b's first score_count[b] entries; 0 after them):
  logp   log p(label) of each scored token
  z      Min-K%++ standardised log-prob (log p(x_t) - mu_t) / sigma_t, with mu_t, sigma_t the mean
         and standard deviation of log p under the model's own next-token distribution at t
  match  1 where the argmax of the next-token logits equals the label
The model runs over every position, but the vocabulary projection (LM head) and the statistics over
the vocabulary only over the scored ones (an answer is often less than half of its padded row).

`score_examples` runs it over a list of encoded examples (dict input_ids, labels). Examples whose tokens
before their first scored label are the same (a question scored with its answer, its paraphrase and
its perturbed answers) share that context: it is laid out once, followed by each example's remaining
tokens, each attending to the context and to itself (a "piece", `plan_rows`). Pieces are packed side
by side into rows of one width (the bucket of the longest example; first-fit decreasing), every
example or context a segment of its own counting its positions as it would alone, so one call runs one
compiled program with little padding and few repeated tokens; the last batch is filled up with copies
of its first row (their results are dropped), and results come back in input order as `SampleScore`s
holding the scored-token arrays and the summed NLL.

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

from jaxunlearn.ops import IGNORE, first_argmax

BATCH_KEYS = ("input_ids", "segments", "contexts", "positions", "score_index", "score_target", "score_count")
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
    match = (first_argmax(x, top) == targets).astype(jnp.float32)
    return logp, (logp - mu) / sigma, match


def visibility(segments: jax.Array, contexts: jax.Array) -> jax.Array:
    """Boolean [B, T, T] (before causality): token q sees token k iff k is in q's segment or in the context
    segment q's segment continues (`contexts`, 0 for none); padding (segment 0) sees only padding."""
    own, keys, context = segments[:, :, None], segments[:, None, :], contexts[:, :, None]
    return (keys == own) | ((keys == context) & (context != 0))


def make_score_fn(
    apply: Callable,
    param_shardings: Any = None,
    batch_sharding: Any = None,
    chunk: int = SCORE_CHUNK,
) -> Callable:
    """Jitted score(params, batch) -> {"logp", "z", "match"} [B, T-1] (see module docstring).

    `apply` has `.hidden(params, ids, mask, positions)` (final-normed hidden states; here mask is a boolean
    [B, T, T] of which tokens each token may see, causality applied on top) and `.head(params, hidden)`
    (logits), as `jaxunlearn.models.make_apply` gives. The batch is what `collate_rows` builds. The head
    and the vocabulary statistics run only at the scored positions (batch["score_index"], with the token
    each predicts in batch["score_target"] and their number per row in batch["score_count"]), `chunk`
    positions per row at a time, as many chunks as the row with the most scored tokens needs.
    """

    def score(params, batch):
        mask = visibility(batch["segments"], batch["contexts"])
        hidden = apply.hidden(params, batch["input_ids"], mask, batch["positions"])
        index, targets, count = batch["score_index"], batch["score_target"], batch["score_count"]
        b, width = index.shape
        padded = -(-width // chunk) * chunk
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


@dataclass(frozen=True)
class Piece:
    """Examples laid out together in a row: their shared first `context` tokens once (none when 0), then
    each member's remaining tokens."""

    context: int
    members: tuple[int, ...]


def context_length(example: Mapping) -> int:
    """The number of tokens before an example's first scored label (its label index; 1 at the least): the
    context that examples with the same tokens there can share."""
    labels = example["labels"]
    return next((t for t in range(1, len(labels)) if labels[t] != IGNORE), len(labels))


def plan_rows(examples: Sequence[Mapping], width: int, share: bool = True) -> list[list[Piece]]:
    """Examples packed into rows of at most `width` tokens, first-fit decreasing by length, as pieces.

    Examples with the same context (`context_length` tokens) share it: one placed in a row that already
    holds its context takes only its remaining tokens (and joins that piece). With `share` False, or for
    an example whose context no other example has, every example is a piece of its own."""
    lengths = np.array([len(e["input_ids"]) for e in examples], np.int64)
    keys = [tuple(e["input_ids"][:context_length(e)]) for e in examples]
    sizes: dict[tuple[int, ...], int] = {}
    for key in keys:
        sizes[key] = sizes.get(key, 0) + 1
    free = np.zeros(0, np.int64)
    rows: list[dict[tuple[int, ...], list[int]]] = []  # per row: context -> its examples there, in order
    where: dict[tuple[int, ...], list[int]] = {}  # context -> rows holding it
    for i in np.argsort(-lengths, kind="stable"):
        key, n = keys[i], int(lengths[i])
        shared = share and sizes[key] > 1
        fits = np.flatnonzero(free >= n)
        best = int(fits[0]) if fits.size else len(rows)
        if shared:
            best = min([best] + [r for r in where.get(key, ()) if free[r] >= n - len(key)])
        if best == len(rows):
            free = np.append(free, width)
            rows.append({})
        at = rows[best].setdefault(key if shared else (-1 - int(i),), [])
        free[best] -= n - len(key) if at else n
        at.append(int(i))
        if shared and best not in where.setdefault(key, []):
            where[key].append(best)
    return [[Piece(len(key) if len(members) > 1 else 0, tuple(members)) for key, members in row.items()]
            for row in rows]


def collate_rows(examples: Sequence[Mapping], rows: Sequence[Sequence[Piece]], width: int,
                 pad_id: int) -> tuple[dict[str, np.ndarray], list[list[tuple[int, int]]]]:
    """(batch, layout) of packed rows, each a list of pieces laid out side by side, then padding.

    batch: int32 [R, width] input_ids; segments (1, 2, ... per context and per example, 0 on padding);
    contexts (the segment of the shared context an example's tokens also see, else 0); positions (each
    example's own, a shared context's tokens counted as the example's first ones); and [R, width - 1]
    score_index / score_target (the row position predicting each scored label, and that label; an
    example's first token is never scored), score_count [R]. layout: per row, (example, scored tokens)
    in the order their scores appear in the row."""
    shape = (len(rows), width)
    ids, segments = np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32)
    contexts, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    index, target = np.zeros((len(rows), width - 1), np.int32), np.zeros((len(rows), width - 1), np.int32)
    count, layout = np.zeros(len(rows), np.int32), []
    for r, row in enumerate(rows):
        at = segment = scored = 0
        placed = []
        for piece in row:
            n_ctx, start = piece.context, at
            if n_ctx:
                segment += 1
                ids[r, at:at + n_ctx] = examples[piece.members[0]]["input_ids"][:n_ctx]
                segments[r, at:at + n_ctx], positions[r, at:at + n_ctx] = segment, np.arange(n_ctx)
                at += n_ctx
            shared = segment if n_ctx else 0
            for i in piece.members:
                e = examples[i]
                n = len(e["input_ids"])
                if len(e["labels"]) != n:
                    raise ValueError(f"example {i}: input_ids and labels differ in length ({n} vs {len(e['labels'])})")
                segment += 1
                ids[r, at:at + n - n_ctx] = e["input_ids"][n_ctx:]
                segments[r, at:at + n - n_ctx], contexts[r, at:at + n - n_ctx] = segment, shared
                positions[r, at:at + n - n_ctx] = np.arange(n_ctx, n)
                steps = [t for t in range(max(n_ctx, 1), n) if e["labels"][t] != IGNORE]
                # label t is predicted at the row position of token t - 1 (the context's last one for t == n_ctx)
                index[r, scored:scored + len(steps)] = [start + t - 1 if t - 1 < n_ctx else at + t - 1 - n_ctx
                                                        for t in steps]
                target[r, scored:scored + len(steps)] = [e["labels"][t] for t in steps]
                scored += len(steps)
                placed.append((i, len(steps)))
                at += n - n_ctx
        count[r] = scored
        layout.append(placed)
    batch = {"input_ids": ids, "segments": segments, "contexts": contexts, "positions": positions,
             "score_index": index, "score_target": target, "score_count": count}
    return batch, layout


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
    share_contexts: bool = True,
) -> list[SampleScore]:
    """Teacher-forced SampleScore per example, in input order (examples with the same context share it
    unless `share_contexts` is False)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from jaxunlearn.data.batching import bucket_length

    if not examples:
        return []
    lengths = [len(e["input_ids"]) for e in examples]
    width = bucket_length(max(lengths), buckets)
    rows = plan_rows(examples, width, share_contexts)
    out: list[SampleScore | None] = [None] * len(examples)
    pending = []
    for start in range(0, len(rows), batch_size):
        batch, layout = collate_rows(examples, rows[start:start + batch_size], width, pad_id)
        pending.append((layout, score_fn(params, place_batch(fill_rows(batch, batch_size), batch_sharding))))
    for layout, res in pending:  # dispatch everything first, then read back
        host = fetch(res)
        for r, placed in enumerate(layout):
            at = 0
            for i, n in placed:  # the row's scored tokens, example after example
                got = {k: host[k][r, at:at + n] for k in ("logp", "z", "match")}
                out[i] = SampleScore(logp=got["logp"], z=got["z"], match=got["match"] > 0)
                at += n
    return out  # type: ignore[return-value]
