"""Objectives: values against direct numpy computations, reference never differentiated, registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.methods import get_method
from jaxunlearn.methods.mox import MoxParams
from jaxunlearn.objectives import OBJECTIVES, UnknownObjectiveError, get_objective
from jaxunlearn.objectives.common import MissingBatchKeyError
from jaxunlearn.ops import IGNORE

V, D = 11, 6


def apply(params, input_ids, attention_mask, positions=None):
    """A small stand-in LM: each position sees the running mean of the embeddings so far."""
    h = params["emb"][input_ids] * attention_mask[..., None]
    h = jnp.cumsum(h, axis=1) / jnp.arange(1, input_ids.shape[1] + 1)[None, :, None]
    return jnp.tanh(h) @ params["out"]


japply = jax.jit(apply)


def make_params(seed):
    rng = np.random.default_rng(seed)
    return {"emb": jnp.asarray(rng.normal(size=(V, D)), jnp.float32), "out": jnp.asarray(rng.normal(size=(D, V)), jnp.float32)}


def make_batch(seed, B=3, T=7, prompt=3, pad_last=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[-1, T - pad_last:] = 0  # last row right-padded
    labels = np.where(mask == 1, ids, IGNORE)
    labels[:, :prompt] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int32)}


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_sample_nll(params, b):
    """Per-sample (summed NLL, token count) by explicit loops."""
    logp = np_log_softmax(japply(params, b["input_ids"], b["attention_mask"]))
    out = []
    for i in range(b["labels"].shape[0]):
        ts = [t for t in range(1, b["labels"].shape[1]) if b["labels"][i, t] != IGNORE]
        out.append((-sum(logp[i, t - 1, b["labels"][i, t]] for t in ts), len(ts)))
    return out


def np_kl(params, ref, b):
    lp = np_log_softmax(japply(params, b["input_ids"], b["attention_mask"]))
    lq = np_log_softmax(japply(ref, b["input_ids"], b["attention_mask"]))
    vals = [
        (np.exp(lq[i, t]) * (lq[i, t] - lp[i, t])).sum()
        for i in range(b["input_ids"].shape[0])
        for t in range(b["input_ids"].shape[1] - 1)
        if b["attention_mask"][i, t + 1] == 1
    ]
    return np.mean(vals)


def jitted(name, **hparams):
    """The objective jitted with the stand-in apply bound (eager dispatch is slow on CPU)."""
    obj = get_objective(name, **hparams)
    return jax.jit(lambda p, r, b: obj(p, r, b, apply))


@pytest.fixture(scope="module")
def setup():
    return make_params(0), make_params(1), {"forget": make_batch(2), "retain": make_batch(3), "target": make_batch(4)}


def test_mox_value_and_reference_not_differentiated(setup):
    params, ref, batch = setup
    obj = jitted("mox", retain_weight=0.7)
    loss, m = obj(params, ref, batch)
    nll = np.mean([s / n for s, n in np_sample_nll(params, batch["forget"])])
    kl = np_kl(params, ref, batch["retain"])
    np.testing.assert_allclose(m["forget_nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(m["retain_kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, nll + 0.7 * kl, rtol=1e-5)
    # KL vanishes at the reference; gradients never flow into the reference
    _, m0 = obj(ref, ref, batch)
    assert abs(float(m0["retain_kl"])) < 1e-6
    g_ref = jax.jit(jax.grad(lambda r: obj(params, r, batch)[0]))(ref)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_ref))


def test_mox_npo_value_and_direction(setup):
    params, ref, batch = setup
    beta = 0.1
    obj = jitted("mox_npo", beta=beta)
    loss, m = obj(params, ref, batch)
    lp = np.array([-s for s, _ in np_sample_nll(params, batch["forget"])])
    lr = np.array([-s for s, _ in np_sample_nll(ref, batch["forget"])])
    log_sig = -np.log1p(np.exp(beta * (lp - lr)))  # log sigmoid(-beta * ratio)
    expected = (2 / beta) * log_sig.mean()
    np.testing.assert_allclose(m["forget_npo"], expected, rtol=1e-5)
    np.testing.assert_allclose(loss, expected + np_kl(params, ref, batch["retain"]), rtol=1e-5)
    # minimising it raises the forget likelihood (memorisation): a small gradient step raises log_ratio
    npo_only = lambda p: obj(p, ref, {"forget": batch["forget"], "retain": batch["forget"]})  # noqa: E731
    g = jax.jit(jax.grad(lambda p: npo_only(p)[1]["forget_npo"]))(params)
    stepped = jax.tree.map(lambda p, d: p - 0.05 * d, params, g)
    assert float(npo_only(stepped)[1]["forget_log_ratio"]) > float(npo_only(params)[1]["forget_log_ratio"])


def test_targeted_and_finetune(setup):
    params, ref, batch = setup
    mox_loss, _ = jitted("mox")(params, ref, batch)
    loss, m = jitted("mox_targeted", target_weight=0.5)(params, ref, batch)
    target_nll = np.mean([s / n for s, n in np_sample_nll(params, batch["target"])])
    np.testing.assert_allclose(m["target_nll"], target_nll, rtol=1e-5)
    np.testing.assert_allclose(loss, float(mox_loss) - 0.5 * target_nll, rtol=1e-5)
    with pytest.raises(MissingBatchKeyError, match="'mox_targeted' needs batch\\['target'\\]"):
        jitted("mox_targeted")(params, ref, {"forget": batch["forget"], "retain": batch["retain"]})

    ft = jitted("finetune")
    pairs = np_sample_nll(params, batch["retain"])
    token_mean = sum(s for s, _ in pairs) / sum(n for _, n in pairs)
    np.testing.assert_allclose(ft(params, None, {"retain": batch["retain"]})[0], token_mean, rtol=1e-5)
    np.testing.assert_allclose(ft(params, None, {"train": batch["retain"], "retain": batch["forget"]})[0], token_mean, rtol=1e-5)
    with pytest.raises(MissingBatchKeyError, match="'finetune' needs"):
        ft(params, None, {"forget": batch["forget"]})


def test_mox_token_reduction(setup):
    params, ref, batch = setup
    pairs = np_sample_nll(params, batch["forget"])
    token_mean = sum(s for s, _ in pairs) / sum(n for _, n in pairs)
    _, m = jitted("mox", nll_reduction="token")(params, ref, batch)
    np.testing.assert_allclose(m["forget_nll"], token_mean, rtol=1e-5)


def test_registry():
    assert {"mox", "mox_npo", "mox_targeted", "finetune", "ga", "graddiff", "kl", "npo", "simnpo", "dpo", "idkdpo",
            "idknll", "rmu", "undial"} <= set(OBJECTIVES)
    with pytest.raises(UnknownObjectiveError, match="unknown objective 'gax'.*known:.*mox"):
        get_objective("gax")
    with pytest.raises(UnknownObjectiveError, match="'mox' does not take \\['beta'\\]"):
        get_objective("mox", beta=0.1)
    # the MOX method passes only the hyper-parameters its objective takes (never alpha, the extrapolation's)
    name, kwargs = get_method("mox").objective(MoxParams(objective="mox_npo", beta=0.3, retain_weight=2.0, alpha=8.0))
    assert (name, kwargs) == ("mox_npo", {"retain_weight": 2.0, "beta": 0.3})
    assert callable(get_objective(name, **kwargs))
