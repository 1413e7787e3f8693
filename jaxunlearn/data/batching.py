"""Static-shape batches: bucket padding, a deterministic paired forget/retain iterator, global arrays.

Batches follow ops.py: int32 [B, T] `input_ids`, `attention_mask`, `labels` (IGNORE = not scored),
right padded for teacher forcing. T is the smallest bucket length that fits the longest sample in
the batch, so jit sees only as many shapes as there are buckets in use. `collate_prompts` left-pads
prompts for generation.

PairedIterator: an epoch is one pass over the forget set in an order drawn from (seed, epoch).
Each step takes `batch_size` forget samples; the last step of an epoch is filled up with the first
samples of that epoch's order, so every batch has the same size. The retain set is an endless
stream of its own permutations (drawn from (seed, pass)); step s takes retain stream positions
[s*B, (s+1)*B). A batch is a pure function of (seed, step): `batch_at(step)` gives it directly and
`iterate(start_step)` resumes from any step.

Multi-host: every host builds the same global batch (it is a function of seed and step), cuts its
own rows with `host_slice`, and `to_global` assembles a global jax.Array from those host-local rows
(jax.make_array_from_process_local_data). On one process host_slice is the identity.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxunlearn.data.errors import DataError
from jaxunlearn.ops import IGNORE



def bucket_ladder(max_len: int, smallest: int = 64) -> tuple[int, ...]:
    """The padded lengths every command uses: `smallest` doubling while below max_len, then max_len
    (bucket_ladder(512) = (64, 128, 256, 512); bucket_ladder(100) = (64, 100))."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (int(max_len),)


DEFAULT_BUCKETS: tuple[int, ...] = bucket_ladder(2048, smallest=32)
_FORGET_STREAM, _RETAIN_STREAM = 1, 2


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length."""
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise DataError(f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}; "
                    "encode with max_len <= the largest bucket")


def collate(examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int,
            buckets: Sequence[int] = DEFAULT_BUCKETS) -> dict[str, np.ndarray]:
    """Right-pad encoded examples (input_ids, labels) to a bucket length: int32 [B, T] arrays."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    width = bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
    n = len(examples)
    input_ids = np.full((n, width), pad_id, np.int32)
    mask = np.zeros((n, width), np.int32)
    labels = np.full((n, width), IGNORE, np.int32)
    for i, e in enumerate(examples):
        ids, lab = e["input_ids"], e["labels"]
        if len(ids) != len(lab):
            raise DataError(f"example {i}: input_ids and labels differ in length ({len(ids)} vs {len(lab)})")
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = lab
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int,
                    buckets: Sequence[int] = DEFAULT_BUCKETS) -> dict[str, np.ndarray]:
    """Left-pad prompt token lists to a bucket length for generation: input_ids, attention_mask [B, T]."""
    if not prompts:
        raise DataError("cannot collate an empty list of prompts")
    width = bucket_length(max(len(p) for p in prompts), buckets)
    input_ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        if len(p):
            input_ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def permutation(n: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, stream, epoch)."""
    return np.random.default_rng([int(seed), int(stream), int(epoch)]).permutation(n)


class PairedIterator:
    """Deterministic paired batches {"forget", "retain"[, "target"]} (see module docstring).

    `target`, when given, is aligned with `forget` (row i is forget prompt i with a target answer)
    and is batched with the same indices as the forget batch.
    """

    def __init__(self, forget: Sequence[Mapping], retain: Sequence[Mapping], batch_size: int, seed: int = 0,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, pad_id: int = 0, target: Sequence[Mapping] | None = None):
        if not forget:
            raise DataError("forget set is empty")
        if not retain:
            raise DataError("retain set is empty")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if target is not None and len(target) != len(forget):
            raise DataError(f"target set has {len(target)} rows but the forget set has {len(forget)}")
        self.forget, self.retain, self.target = list(forget), list(retain), None if target is None else list(target)
        self.batch_size, self.seed, self.pad_id = int(batch_size), int(seed), int(pad_id)
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.steps_per_epoch = -(-len(self.forget) // self.batch_size)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def forget_indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(int(step), self.steps_per_epoch)
        order = permutation(len(self.forget), self.seed, _FORGET_STREAM, epoch)
        pos = (np.arange(self.batch_size) + k * self.batch_size) % len(order)
        return order[pos]

    def retain_indices(self, step: int) -> np.ndarray:
        n = len(self.retain)
        pos = np.arange(self.batch_size, dtype=np.int64) + int(step) * self.batch_size
        passes, within = np.divmod(pos, n)
        out = np.empty(self.batch_size, np.int64)
        for p in np.unique(passes):
            sel = passes == p
            out[sel] = permutation(n, self.seed, _RETAIN_STREAM, int(p))[within[sel]]
        return out

    def batch_at(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """The paired batch of a given step (0-based)."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        fi, ri = self.forget_indices(step), self.retain_indices(step)
        batch = {
            "forget": collate([self.forget[i] for i in fi], self.pad_id, self.buckets),
            "retain": collate([self.retain[i] for i in ri], self.pad_id, self.buckets),
        }
        if self.target is not None:
            batch["target"] = collate([self.target[i] for i in fi], self.pad_id, self.buckets)
        return batch

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
        """Batches from start_step on (num_steps of them, or without end)."""
        step = int(start_step)
        while num_steps is None or step < start_step + num_steps:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict]:
        return self.iterate(0)


def host_slice(batch: Any, process_index: int | None = None, process_count: int | None = None) -> Any:
    """This host's rows of a global batch (a pytree of [B, ...] arrays): rows [i*B/n, (i+1)*B/n)."""
    import jax

    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count

    def cut(x):
        if x.shape[0] % count:
            raise DataError(f"global batch of {x.shape[0]} rows does not split over {count} processes")
        per = x.shape[0] // count
        return x[index * per:(index + 1) * per]

    return jax.tree.map(cut, batch)


def to_global(batch: Any, sharding: Any) -> Any:
    """Host-local numpy batch (pytree) -> global jax.Arrays laid out by `sharding`.

    Each process passes its own rows (see host_slice); the global batch dimension is the sum over
    processes. `sharding` is one Sharding for every leaf or a pytree of shardings matching batch.
    """
    import jax

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), batch, sharding)
