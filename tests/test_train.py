"""Train step and loop on the tiny decoder: memorisation works, sharded == single device,
non-finite guard, exact resume from any step, schedule, gradient accumulation, bf16 compute.

Compiled steps are cached per (mesh shape, objective) and shared by the tests (CPU compiles
dominate the run time)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn.models import ModelConfig, init_model, make_apply, param_logical_axes, split_params
from jaxunlearn.objectives import get_objective
from jaxunlearn.objectives.common import mean_nll
from jaxunlearn.ops import IGNORE
from jaxunlearn.optim import StepPlan, linear_schedule, make_optimizer, optimizer_from_spec
from jaxunlearn.config import TrainSpec
from jaxunlearn.sharding import make_mesh, param_shardings, replicated
from jaxunlearn.train import NonFiniteError, TrainState, copy_tree, init_opt_state, make_train_step, train_loop

V, B, T, PROMPT = 32, 8, 16, 6
POISON = V - 1  # a token id that never occurs in normal batches; makes the test objective NaN
N_STEPS = 30
LR = 1e-2


def make_batch(rng, n=B):
    ids = rng.integers(3, POISON, (n, T)).astype(np.int32)
    mask = np.ones((n, T), np.int32)
    mask[0, T - 3:] = 0  # one right-padded row
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    labels[:, :PROMPT] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def world():
    # one layer, narrow: the same code paths as the tiny preset, half the compile time
    cfg = ModelConfig.preset("tiny-llama", vocab_size=V, num_layers=1, hidden_size=32, intermediate_size=64,
                             num_heads=2, num_kv_heads=2, head_dim=16)
    graphdef, abstract = split_params(nnx.eval_shape(lambda: init_model(cfg)))
    rng = np.random.default_rng(0)
    # host-side random init with the model's shapes (eager init is slow on CPU): normal(0, 0.02), norms = 1
    # (vectors per layer: the stacked layer parameters have a leading "layers" axis)
    axes = param_logical_axes(abstract)
    params = jax.tree.map(
        lambda s, ax: np.ones(s.shape, s.dtype) if layer_ndim(ax) == 1 else (0.02 * rng.standard_normal(s.shape)).astype(s.dtype),
        abstract, axes,
    )
    batches = [{"forget": make_batch(rng), "retain": make_batch(rng)} for _ in range(2)]
    return dict(cfg=cfg, graphdef=graphdef, apply=make_apply(graphdef), params=params, axes=axes,
                batches=batches)


def layer_ndim(axes: tuple) -> int:
    """Rank of one layer's slice of a parameter with these logical axes."""
    return len([a for a in axes if a != "layers"])


def weighted_mox():
    """MOX with the retain weight read from the batch (so one compiled step serves every weight)
    whose loss turns NaN when the forget batch contains the POISON token (for the guard test)."""
    mox = get_objective("mox", retain_weight=0.0)  # its metrics carry both terms, differentiably

    def objective(params, ref_params, batch, apply):
        _, metrics = mox(params, ref_params, batch, apply)
        loss = metrics["forget_nll"] + batch["retain_weight"][0] * metrics["retain_kl"]
        poisoned = jnp.any(batch["forget"]["input_ids"] == POISON)
        return jnp.where(poisoned, jnp.nan, loss), metrics

    return objective


@functools.lru_cache(maxsize=None)
def compiled(world_id, mesh_shape):
    w = WORLDS[world_id]
    mesh = make_mesh(*mesh_shape)
    shardings = param_shardings(w["axes"], mesh, w["params"])
    opt, schedule = make_optimizer(LR, N_STEPS, warmup_steps=3)
    step = make_train_step(weighted_mox(), w["apply"], opt, mesh, shardings, params=w["params"], schedule=schedule)
    return mesh, shardings, opt, step


WORLDS = {}


def start(world, mesh_shape):
    WORLDS[id(world)] = world
    mesh, shardings, opt, step = compiled(id(world), mesh_shape)
    params = jax.device_put(world["params"], shardings)
    ref = copy_tree(params)
    opt_state, _ = init_opt_state(opt, params, shardings, mesh)
    return step, TrainState(0, params, opt_state), ref


def batches_from(world, poison_at=None, retain_weight=1.0):
    weight = np.full((B,), retain_weight, np.float32)

    def it(k):
        while True:
            batch = {**world["batches"][k % 2], "retain_weight": weight}
            if k == poison_at:
                batch = {**batch, "forget": {**batch["forget"], "input_ids": np.full((B, T), POISON, np.int32)}}
            yield batch
            k += 1

    return it


def run(world, mesh_shape, n_steps=N_STEPS, retain_weight=1.0):
    step, state, ref = start(world, mesh_shape)
    history = []
    batches = batches_from(world, retain_weight=retain_weight)
    state = train_loop(step, state, ref, batches, n_steps, on_step=lambda s, m: history.append(m))
    return state, history


def host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.fixture(scope="module")
def sharded(world):
    state, hist = run(world, (2, 2, 2))
    return host(state.params), hist


@pytest.fixture(scope="module")
def single(world):
    state, hist = run(world, (1, 1, 1))
    return host(state.params), hist


def test_memorisation_lowers_forget_nll_keeps_retain_kl_small(world, sharded):
    _, hist = sharded
    first, last = hist[0], hist[-1]
    assert len(hist) == N_STEPS and all(m["finite"] for m in hist)
    # the same two batches alternate: compare like with like (steps 0/28 and 1/29)
    assert hist[-2]["forget_nll"] < first["forget_nll"] - 1.0, [round(m["forget_nll"], 3) for m in hist]
    assert last["forget_nll"] < hist[1]["forget_nll"] - 1.0
    assert first["retain_kl"] < 1e-6  # the model starts at the reference
    # without the KL term the same training drifts much further on retain data
    _, free = run(world, (1, 1, 1), retain_weight=0.0)
    assert free[-1]["forget_nll"] < first["forget_nll"] - 1.0
    assert last["retain_kl"] < 0.35 * free[-1]["retain_kl"], (last["retain_kl"], free[-1]["retain_kl"])  # measured ~0.2
    assert last["retain_kl"] < 0.1 * (first["forget_nll"] - last["forget_nll"])


def test_sharded_run_matches_single_device(sharded, single):
    """data=2, fsdp=2, tensor=2 vs one device after 30 AdamW steps: losses within rtol 1e-5,
    parameters within atol 1e-5 (reduction order differs across shardings; measured ~2e-7)."""
    p8, h8 = sharded
    p1, h1 = single
    for a, b in zip(h8, h1):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a["lr"], b["lr"], rtol=1e-6)
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1))]
    assert max(diffs) < 1e-5, max(diffs)


def test_step_donates_state_not_reference_and_keeps_shardings(world):
    step, state, ref = start(world, (2, 2, 2))
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    params, opt_state, _ = step(state.params, state.opt_state, next(batches_from(world)(0)), ref)
    assert all(x.is_deleted() for x in jax.tree.leaves((state.params, state.opt_state)))
    assert not any(x.is_deleted() for x in jax.tree.leaves(ref))
    for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert x.sharding.is_equivalent_to(sh, x.ndim)
    assert any("fsdp" in x.sharding.spec or "tensor" in x.sharding.spec for x in jax.tree.leaves(opt_state) if x.ndim)


def test_nonfinite_guard_stops_with_params_unchanged(world):
    step, state, ref = start(world, (2, 2, 2))
    seen = {}
    bad_step = 4

    def keep_copy(s, m):
        seen[s.step] = host(s.params)

    with pytest.raises(NonFiniteError, match=f"non-finite loss or gradient at step {bad_step} .*last good checkpoint kept") as info:
        train_loop(step, state, ref, batches_from(world, poison_at=bad_step), 10, on_step=keep_copy)
    assert max(seen) == bad_step  # no callback (checkpoint) for the bad step
    kept = info.value.state
    assert kept.step == bad_step
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), kept.params, seen[bad_step])
    # the optimiser state is intact too: continuing from the kept state with good data works
    good = train_loop(step, kept, ref, batches_from(world), bad_step + 1)
    assert good.step == bad_step + 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good.params))


def test_resume_from_any_step_is_bitwise_exact(world):
    """A run restarted at step k from its state (and the iterator restarted at k) equals an
    uninterrupted run bit for bit."""
    n, k = 8, 5
    step, state, ref = start(world, (1, 1, 1))
    saved = {}

    def save_at_k(s, m):
        if s.step == k:
            saved["state"] = TrainState(s.step, copy_tree(s.params), copy_tree(s.opt_state))

    straight = train_loop(step, state, ref, batches_from(world), n, on_step=save_at_k)
    resumed = train_loop(step, saved["state"], ref, batches_from(world), n)
    assert resumed.step == straight.step == n
    for a, b in zip(jax.tree.leaves((straight.params, straight.opt_state)), jax.tree.leaves((resumed.params, resumed.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_schedule_and_step_plan():
    sched = linear_schedule(1.0, total_steps=10, warmup_steps=2)
    values = [float(sched(i)) for i in range(11)]
    np.testing.assert_allclose(values[:3], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(values[2:], np.linspace(1.0, 0.0, 9), atol=1e-6)
    assert float(linear_schedule(2.0, 4, 0)(0)) == 2.0
    plan = StepPlan(micro_steps_per_epoch=10, grad_accum=2, epochs=3)
    assert (plan.steps_per_epoch, plan.total_steps, plan.total_micro_steps, plan.warmup_steps(1.0)) == (5, 15, 30, 5)
    assert StepPlan(10, 1, 3, max_steps=7).total_steps == 7
    _, schedule, plan = optimizer_from_spec(TrainSpec(lr=1e-3, epochs=4, warmup_epochs=1.0), micro_steps_per_epoch=5)
    assert plan.total_steps == 20
    assert float(schedule(5)) == pytest.approx(1e-3) and float(schedule(20)) == 0.0


def test_weight_decay_only_on_matrices(world):
    """Zero gradients: only matrices (ndim >= 2 per layer) shrink (decoupled decay), norm scales do not."""
    params = jax.tree.map(jnp.asarray, world["params"])
    opt, _ = make_optimizer(1.0, total_steps=4, warmup_steps=0, weight_decay=0.5)
    updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    axes = jax.tree.leaves(world["axes"], is_leaf=lambda x: isinstance(x, tuple))
    for u, p, ax in zip(jax.tree.leaves(updates), jax.tree.leaves(params), axes):
        if layer_ndim(ax) >= 2:
            np.testing.assert_allclose(u, -0.5 * p, rtol=1e-6)
        else:
            assert float(jnp.abs(u).max()) == 0.0


def test_gradient_accumulation_equals_large_batch():
    """grad_accum=2 over two micro-batches == one step on their concatenation (equal-size batches,
    every sample scored), for a small stand-in LM on a one-device mesh."""

    def apply(params, input_ids, attention_mask, positions=None):
        h = jnp.cumsum(params["emb"][input_ids] * attention_mask[..., None], axis=1)
        return jnp.tanh(h) @ params["out"]

    rng = np.random.default_rng(1)
    params = {"emb": rng.normal(size=(V, 8)).astype(np.float32), "out": rng.normal(size=(8, V)).astype(np.float32)}
    mesh = make_mesh(1, 1, 1)
    sh = jax.tree.map(lambda _: replicated(mesh), params)
    a, b = make_batch(rng, 4), make_batch(rng, 4)
    for x in (a, b):
        x["attention_mask"][:] = 1
        x["labels"][:, PROMPT:] = x["input_ids"][:, PROMPT:]
    both = {k: np.concatenate([a[k], b[k]]) for k in a}
    obj = get_objective("finetune")

    def train(grad_accum, batches):
        opt, _ = make_optimizer(1e-2, total_steps=3, warmup_steps=0, grad_accum=grad_accum, clip_norm=1.0)
        step = make_train_step(obj, apply, opt, mesh, sh, params=params)
        p = jax.device_put(params, sh)
        s, _ = init_opt_state(opt, p, sh, mesh)
        ref = jax.device_put(params, sh)  # unused by "finetune" but never donated
        for batch in batches:
            p, s, _ = step(p, s, {"train": batch}, ref)
        return host(p)

    accum = train(2, [a, b, a, b])
    large = train(1, [both, both])
    for x, y in zip(jax.tree.leaves(accum), jax.tree.leaves(large)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert any(float(np.max(np.abs(x - y))) > 1e-3 for x, y in zip(jax.tree.leaves(accum), jax.tree.leaves(params)))


def test_bf16_compute_close_to_fp32(world, sharded):
    """A bfloat16-compute model (dtype="bfloat16") over the same float32 params: the forget NLL is
    close to the float32 one (step 0 of the float32 run) but not identical. Parameters, hence
    gradients and optimiser state, stay float32 because they are what the step differentiates."""
    graphdef16, _ = split_params(nnx.eval_shape(lambda: init_model(world["cfg"], dtype="bfloat16")))
    apply16 = make_apply(graphdef16)
    forget = world["batches"][0]["forget"]
    params = jax.tree.map(jnp.asarray, world["params"])
    nll16 = float(jax.jit(lambda p, b: mean_nll(apply16(p, b["input_ids"], b["attention_mask"]), b["labels"]))(params, forget))
    fp32_nll = sharded[1][0]["forget_nll"]
    assert nll16 == pytest.approx(fp32_nll, rel=2e-2)
    assert nll16 != fp32_nll  # it really computed in bfloat16
