"""Jitted teacher-forced scoring and KV-cache generation on a small stand-in model.

8 devices == 1 device is checked with the real model in tests/test_evals_pipeline.py.
The stand-in implements the models contract (apply / decode with a KV cache) with one attention
layer, so these tests do not depend on jaxunlearn.models; tests/test_evals_hf_parity.py runs the
real models against transformers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.evals import generate as G
from jaxunlearn.evals import scoring as S
from jaxunlearn.ops import IGNORE, first_argmax

V, D, MAXPOS = 37, 16, 64
PAD, EOS = 0, 1


def _params(seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    n = lambda k, s: jax.random.normal(k, s, jnp.float32) * 0.5  # noqa: E731
    return {"emb": n(ks[0], (V, D)), "pos": n(ks[1], (MAXPOS, D)), "wq": n(ks[2], (D, D)),
            "wk": n(ks[3], (D, D)), "wv": n(ks[4], (D, D)), "out": n(ks[5], (D, V)) * 3.0}


def _hidden(params, x, keys, values, allowed):
    q = x @ params["wq"]
    s = jnp.einsum("bqd,bkd->bqk", q, keys) / np.sqrt(D)
    s = jnp.where(allowed, s, -1e30)
    return x + jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), values)


def _attend(params, x, keys, values, allowed):
    return _hidden(params, x, keys, values, allowed) @ params["out"]


class StandinApply:
    """apply(params, ids, mask) -> logits, with .hidden and .head (the models contract scoring uses)."""

    def hidden(self, params, input_ids, attention_mask, positions=None):
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        x = params["emb"][input_ids] + params["pos"][positions]
        t = input_ids.shape[1]
        if attention_mask.ndim == 3:  # explicit [B, T, T] visibility
            seen = attention_mask
        else:
            keys, own = attention_mask[:, None, :], attention_mask[:, :, None]  # segment ids, 0 for padding
            seen = (keys > 0) & ((keys == own) | (own == 0))
        allowed = jnp.tril(jnp.ones((t, t), bool))[None] & seen
        return _hidden(params, x, x @ params["wk"], x @ params["wv"], allowed)

    def head(self, params, hidden):
        return hidden @ params["out"]

    def __call__(self, params, input_ids, attention_mask, positions=None):
        return self.head(params, self.hidden(params, input_ids, attention_mask, positions))


standin_apply = StandinApply()


def standin_cache(batch, max_len):
    return {"k": jnp.zeros((batch, max_len, D)), "v": jnp.zeros((batch, max_len, D))}


def standin_decode(params, input_ids, positions, kv_mask, cache, cache_index):
    x = params["emb"][input_ids] + params["pos"][positions]
    k = jax.lax.dynamic_update_slice(cache["k"], x @ params["wk"], (0, cache_index, 0))
    v = jax.lax.dynamic_update_slice(cache["v"], x @ params["wv"], (0, cache_index, 0))
    slots = cache_index + jnp.arange(input_ids.shape[1])
    allowed = (jnp.arange(k.shape[1])[None, :] <= slots[:, None])[None] & (kv_mask[:, None, :] > 0)
    return _attend(params, x, k, v, allowed), {"k": k, "v": v}


def _examples(n, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        n_prompt, n_answer = rng.integers(2, 7), rng.integers(1, 9)
        ids = rng.integers(2, V, size=n_prompt + n_answer).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:]})
    return out


@pytest.fixture(scope="module")
def params():
    return _params()


@pytest.fixture(scope="module")
def score_fn():
    return S.make_score_fn(standin_apply)


def _close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.count == y.count
        np.testing.assert_allclose(x.logp, y.logp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x.z, y.z, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(x.match, y.match)


def test_vocab_stats_by_hand():
    logits = jnp.array([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    logp, z, match = jax.device_get(jax.jit(S.vocab_stats)(logits, jnp.array([2, 1])))
    p = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    lp = np.log(p)
    mu = (p * lp).sum()
    sigma = np.sqrt((p * lp**2).sum() - mu**2)
    assert logp[0] == pytest.approx(lp[2], abs=1e-6)
    assert z[0] == pytest.approx((lp[2] - mu) / sigma, abs=1e-5)
    assert match.tolist() == [1.0, 0.0]


def test_plan_rows_by_hand():
    ex = [{"input_ids": [2] * n, "labels": [IGNORE] + [2] * (n - 1)} for n in (3, 2, 5)]  # contexts [2]: shared
    assert S.plan_rows(ex, width=6, share=False) == [[S.Piece(0, (2,))], [S.Piece(0, (0,)), S.Piece(0, (1,))]]
    # longest first; the 1-token context shared: the 3-token one would take 2 more in row 0 (1 free), the
    # 2-token one takes 1 there
    assert S.plan_rows(ex, width=6) == [[S.Piece(1, (2, 1))], [S.Piece(0, (0,))]]
    assert S.plan_rows(ex, width=8) == [[S.Piece(1, (2, 0, 1))]]  # 5 + 2 + 1 = 8 tokens


def test_collate_rows_by_hand():
    # examples 0 and 2 share the context [2, 3] (tokens before their first scored label); 1 is alone
    ex = [{"input_ids": [2, 3, 4, 5], "labels": [IGNORE, IGNORE, 4, 5]},
          {"input_ids": [2, 6, 7], "labels": [IGNORE, 6, 7]},
          {"input_ids": [2, 3, 8], "labels": [IGNORE, IGNORE, 8]}]
    rows = S.plan_rows(ex, width=6)
    assert rows == [[S.Piece(2, (0, 2))], [S.Piece(0, (1,))]]  # 4 tokens, then 3 (no room), then 3 - 2 = 1 after its context
    b, layout = S.collate_rows(ex, rows, 6, PAD)
    assert b["input_ids"].tolist() == [[2, 3, 4, 5, 8, PAD], [2, 6, 7] + [PAD] * 3]
    assert b["segments"].tolist() == [[1, 1, 2, 2, 3, 0], [1, 1, 1, 0, 0, 0]]
    assert b["contexts"].tolist() == [[0, 0, 1, 1, 1, 0], [0] * 6]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 2, 0], [0, 1, 2, 0, 0, 0]]
    # token 4 and token 8 are both predicted at the context's last position (1); token 5 at position 2
    assert b["score_count"].tolist() == [3, 2]
    assert b["score_index"][0, :3].tolist() == [1, 2, 1] and b["score_target"][0, :3].tolist() == [4, 5, 8]
    assert b["score_index"][1, :2].tolist() == [0, 1] and b["score_target"][1, :2].tolist() == [6, 7]
    assert layout == [[(0, 2), (2, 1)], [(1, 2)]]
    seen = np.asarray(S.visibility(jnp.asarray(b["segments"]), jnp.asarray(b["contexts"])))[0]
    assert seen[4].tolist() == [True, True, False, False, True, False]  # context + itself
    assert seen[2].tolist() == [True, True, True, True, False, False]


def _shared_context_examples(seed=2):
    """Questions each scored with several answers (as TOFU's answer / paraphrase / perturbed answers)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(4):
        question = rng.integers(2, V, size=rng.integers(2, 7)).tolist()
        for _ in range(rng.integers(1, 5)):
            answer = rng.integers(2, V, size=rng.integers(1, 9)).tolist()
            out.append({"input_ids": question + answer, "labels": [IGNORE] * len(question) + answer})
    return out


def test_packed_scores_equal_one_example_per_row(params, score_fn):
    ex = _examples(9, seed=7) + _shared_context_examples()
    alone = S.score_examples(score_fn, params, ex, batch_size=1, pad_id=PAD, buckets=(16,), share_contexts=False)
    packed = S.score_examples(score_fn, params, ex, batch_size=2, pad_id=PAD, buckets=(40,))  # several per row
    rows = S.plan_rows(ex, 40)
    assert len(rows) < len(S.plan_rows(ex, 40, share=False)) < len(ex)  # shared contexts laid out once
    assert any(p.context for row in rows for p in row)
    _close(alone, packed)


def test_scores_in_chunks_equal_one_pass(params):
    # chunk 4 < the longest answer: several passes, rows with fewer scored tokens than the longest
    ex = _examples(6, seed=5)
    one_pass = S.score_examples(S.make_score_fn(standin_apply, chunk=64), params, ex, 3, PAD, (16,))
    chunked = S.score_examples(S.make_score_fn(standin_apply, chunk=4), params, ex, 3, PAD, (16,))
    _close(one_pass, chunked)  # equal up to float32 rounding of the head matmul at another shape


def test_batched_equals_unbatched_and_padding_invariant(params, score_fn):
    ex = _examples(11)
    # 11 examples in batches of 4: the last batch has fill rows; bucket 32 pads far more than 16
    one = S.score_examples(score_fn, params, ex, batch_size=1, pad_id=PAD, buckets=(16,))
    wide = S.score_examples(score_fn, params, ex, batch_size=4, pad_id=PAD, buckets=(32,))
    _close(one, wide)
    # against a direct, unpadded forward pass of one example
    e = ex[3]
    ids = jnp.array([e["input_ids"]])
    logits = _apply_jit(params, ids, jnp.ones_like(ids))
    lp = jax.nn.log_softmax(logits[0, :-1], -1)[jnp.arange(ids.shape[1] - 1), ids[0, 1:]]
    keep = np.array(e["labels"][1:]) != IGNORE
    np.testing.assert_allclose(one[3].logp, np.asarray(lp)[keep], rtol=1e-5, atol=1e-5)
    assert one[3].mean_nll == pytest.approx(-float(np.asarray(lp)[keep].mean()), rel=1e-5)


_apply_jit = jax.jit(standin_apply)


def _naive_greedy(params, prompt, n_new):
    """Greedy decoding by full re-computation (no cache), one unpadded sequence at a time."""
    ids = list(prompt)
    out = []
    width = 16  # right padding does not change causal logits at real positions
    for _ in range(n_new):
        arr = jnp.array([ids + [PAD] * (width - len(ids))])
        mask = (jnp.arange(width) < len(ids)).astype(jnp.int32)[None]
        nxt = int(jnp.argmax(_apply_jit(params, arr, mask)[0, len(ids) - 1]))
        out.append(nxt)
        if nxt == EOS:
            break
        ids.append(nxt)
    return out


N_NEW = 6


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(2, V, size=n).tolist() for n in (3, 7, 5, 1, 8, 2)]


def test_generation_matches_naive_greedy(params, prompts):
    # make EOS likely so some rows stop early
    p = dict(params, out=params["out"].at[:, EOS].add(2.0))
    gen = G.make_generate_fn(standin_decode, standin_cache, N_NEW, EOS, PAD)
    got = G.generate_tokens(gen, p, prompts, batch_size=4, pad_id=PAD, eos_id=EOS, buckets=(8,))
    want = [G.trim_at_eos(_naive_greedy(p, pr, N_NEW), EOS) for pr in prompts]
    assert got == want
    assert any(len(g) < N_NEW for g in got)


def test_first_argmax_is_argmax_with_ties_and_nans():
    """ops.first_argmax (a max and a min; generation's greedy token, scoring's match) answers as jnp.argmax:
    first of tied maxima, first NaN, -inf rows."""
    rng = np.random.default_rng(0)
    rows = rng.integers(-3, 4, (6, 9)).astype(np.float32)  # small integers: many ties
    rows[1, [2, 5]] = np.nan
    rows[2] = -np.inf
    rows[3, 4] = np.inf
    rows[4, 0] = -0.0
    rows[4, 1:] = 0.0
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(rows)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(rows), axis=-1)))
    assert got.dtype == np.int32
    given = jax.jit(lambda x: first_argmax(x, jnp.max(x, axis=-1, keepdims=True)))(jnp.asarray(rows))
    np.testing.assert_array_equal(np.asarray(given), got)  # the caller's max (scoring's vocab_stats) as well


def test_trim_and_stop_strings():
    assert G.trim_at_eos([4, 5, EOS, 6], EOS) == [4, 5]
    assert G.trim_at_eos([4, 5], EOS) == [4, 5]

    class Tok:
        def batch_decode(self, lists, skip_special_tokens=True):
            return [" ".join(map(str, ids)) for ids in lists]

    assert G.decode_texts(Tok(), [[1, 2, 3]], stop_strings=(" 3",)) == ["1 2"]
