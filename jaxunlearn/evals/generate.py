"""Jitted greedy generation with a KV cache.

Shapes are static: a batch of prompts left-padded to a width P (every batch of one call to the same P:
the longest prompt rounded up to a multiple of 16), and max_new_tokens N, so the cache holds P + N slots
and one compiled function serves every batch of that width.
The prefill writes the P prompt slots in one call; a `lax.while_loop` then feeds back one
token per step (slot P + i), until N tokens are out or every row has produced EOS. Rows that
finished emit `pad_id` (as `transformers` greedy `generate` does). Stop strings are applied
after decoding to text.

Uses the models contract: `init_cache(cfg, batch, max_len, dtype)` and
`decode(params, ids[B,S], positions[B,S], kv_mask[B,max_len], cache, cache_index) -> (logits, cache)`,
where a query at slot s sees slot j iff j <= s and kv_mask[b, j] == 1; when decode has a `prepare`
attribute, `decode.prepare(params)` is what the prefill and the loop pass as params (built once per call).
Positions of a left-padded prompt are cumsum(mask) - 1 (clipped at 0); generated tokens
continue from the prompt length, so a row's positions do not depend on its padding.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxunlearn.evals.metrics import cut_at
from jaxunlearn.evals.scoring import batch_order, fetch, fill_rows, place_batch
from jaxunlearn.ops import first_argmax

PROMPT_WIDTH_STEP = 16  # generation prompts are left-padded to a multiple of this (see generate_tokens)


def make_generate_fn(
    decode: Callable,
    new_cache: Callable[[int, int], Any],
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    param_shardings: Any = None,
    batch_sharding: Any = None,
) -> Callable:
    """Jitted gen(params, input_ids[B,P], attention_mask[B,P]) -> int32 tokens [B, max_new_tokens].

    new_cache(batch, max_len) builds an empty cache (e.g. partial(init_cache, cfg, dtype=...)).
    """
    n_new = int(max_new_tokens)
    if n_new < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = -1 if eos_id is None else int(eos_id)

    prepare = getattr(decode, "prepare", lambda params: params)

    def gen(params, input_ids, attention_mask):
        params = prepare(params)
        b, p = input_ids.shape
        mask = attention_mask.astype(jnp.int32)
        kv_mask = jnp.concatenate([mask, jnp.ones((b, n_new), jnp.int32)], axis=1)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        cache = new_cache(b, p + n_new)
        logits, cache = decode(params, input_ids, positions, kv_mask, cache, 0)
        first = first_argmax(logits[:, -1])
        out = jnp.full((b, n_new), pad_id, jnp.int32)

        def cond(state):
            i, _, _, done, _, _ = state
            return (i < n_new) & ~jnp.all(done)

        def body(state):
            i, tok, pos, done, out, cache = state
            tok = jnp.where(done, pad_id, tok)
            out = lax.dynamic_update_slice(out, tok[:, None], (0, i))
            done = done | (tok == eos)
            logits, cache = decode(params, tok[:, None], pos[:, None], kv_mask, cache, p + i)
            nxt = first_argmax(logits[:, -1])
            return i + 1, nxt, pos + 1, done, out, cache

        state = (jnp.int32(0), first, mask.sum(axis=1), jnp.zeros((b,), bool), out, cache)
        return lax.while_loop(cond, body, state)[4]

    if batch_sharding is None:
        return jax.jit(gen)
    return jax.jit(gen, in_shardings=(param_shardings, batch_sharding, batch_sharding),
                   out_shardings=batch_sharding)


def trim_at_eos(tokens: Sequence[int], eos_id: int | None) -> list[int]:
    """Generated tokens up to (not including) the first EOS."""
    toks = [int(t) for t in tokens]
    if eos_id is not None and int(eos_id) in toks:
        return toks[: toks.index(int(eos_id))]
    return toks


def generate_tokens(
    gen_fn: Callable,
    params: Any,
    prompts: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    eos_id: int | None,
    buckets: Sequence[int],
    batch_sharding: Any = None,
) -> list[list[int]]:
    """Greedy continuation token ids per prompt (EOS and what follows removed), in input order.

    Every batch is left-padded to one width, so that one call runs one compiled program: the longest
    prompt rounded up to a multiple of PROMPT_WIDTH_STEP (at most its bucket). Left padding costs no
    decoding step, but every step attends over the whole cache (prompt width + max_new_tokens slots),
    so the width is kept tight rather than a bucket's."""
    from jaxunlearn.data.batching import bucket_length, collate_prompts

    order = batch_order([len(p) for p in prompts])
    longest = max(len(p) for p in prompts)
    width = (min(bucket_length(longest, buckets), -(-longest // PROMPT_WIDTH_STEP) * PROMPT_WIDTH_STEP),)
    pending = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = fill_rows(collate_prompts([prompts[i] for i in idx], pad_id, width), batch_size)
        placed = place_batch(batch, batch_sharding)
        pending.append((idx, gen_fn(params, placed["input_ids"], placed["attention_mask"])))
    out: list[list[int]] = [[] for _ in prompts]
    for idx, toks in pending:
        host = np.asarray(fetch(toks))
        for row, i in enumerate(idx):
            out[i] = trim_at_eos(host[row], eos_id)
    return out


def decode_texts(tokenizer: Any, token_lists: Sequence[Sequence[int]], stop_strings: Sequence[str] = ()) -> list[str]:
    """Decode generated ids (special tokens skipped) and cut each text at the first stop string."""
    texts = tokenizer.batch_decode([list(t) for t in token_lists], skip_special_tokens=True)
    return [cut_at(t, stop_strings) for t in texts]
