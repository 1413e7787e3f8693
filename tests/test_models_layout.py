"""Checkpoints written before decoder layers were stacked (per-layer `layers/0/...` trees) restore onto the
stacked layout: reference/forget folders and memorised steps (params and optimiser state)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import checkpoint as ck
from jaxunlearn.models import ModelConfig, init_model, param_logical_axes, split_params
from jaxunlearn.models.layout import is_per_layer, stack_layers, unstack_layers
from jaxunlearn.optim import make_optimizer
from jaxunlearn.sharding import make_mesh, param_shardings


@pytest.fixture(scope="module")
def stacked():
    """(params on a 2x2x2 mesh, abstract target with shardings, optimiser)."""
    cfg = ModelConfig.preset("tiny-llama-gqa", vocab_size=64, num_layers=3)
    _, params = split_params(init_model(cfg, seed=2))
    mesh = make_mesh(2, 2, 2)
    shardings = param_shardings(param_logical_axes(params), mesh, params)
    params = jax.device_put(params, shardings)
    optimizer, _ = make_optimizer(1e-3, 10, 1)
    return params, ck.abstract_tree(params, shardings), optimizer


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unstack_then_stack_is_identity(stacked):
    params, target, _ = stacked
    old = unstack_layers(params)
    paths = list(ck.tree_summary(old))
    assert "layers/2/self_attn/k_proj/kernel" in paths and is_per_layer(paths)
    assert not is_per_layer(ck.tree_summary(params))
    assert_same(stack_layers(old), params)
    abstract_old = unstack_layers(target)
    leaf = abstract_old["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert leaf.shape == (64, 4, 16) and leaf.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_old_reference_and_forget_restore_stacked(stacked, tmp_path):
    params, target, _ = stacked
    run = tmp_path / "run"
    ck.save_reference(run, unstack_layers(params))  # what the previous version wrote
    ck.save_forget(run, unstack_layers(params), alpha=2.0, source_step=1)
    got, _ = ck.load_reference(run, target)  # content hash checked on the tree as written
    assert_same(got, params)
    assert got["layers"]["mlp"]["up_proj"]["kernel"][...].sharding == target["layers"]["mlp"]["up_proj"]["kernel"].sharding
    ck.verify_reference(run, params)  # the stacked params are the run's reference
    with pytest.raises(ck.HashMismatchError):
        ck.verify_reference(run, jax.tree.map(lambda x: x + 1, params))
    assert_same(ck.load_forget(run, 2.0, target)[0], params)


def test_old_memorised_step_restores_stacked(stacked, tmp_path):
    params, target, optimizer = stacked
    old = unstack_layers(params)
    opt_state = optimizer.init(old)
    opt_state = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, opt_state)
    with ck.MemorizedCheckpoints(tmp_path / "run", async_save=False) as mgr:
        mgr.save(3, old, opt_state, jax.random.key(0), {"step": 3})
    want_opt = stack_layers(opt_state)
    opt_target = ck.abstract_tree(jax.eval_shape(optimizer.init, target))
    with ck.MemorizedCheckpoints(tmp_path / "run", async_save=False) as mgr:
        got = mgr.restore(target, opt_target)
    assert_same(got["params"], params)
    assert_same(got["opt_state"], want_opt)
    # a checkpoint that matches neither layout still fails in one line
    wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape, x.dtype), target)
    with ck.MemorizedCheckpoints(tmp_path / "run", async_save=False) as mgr:
        with pytest.raises(ck.CheckpointError, match="cannot restore memorised checkpoint"):
            mgr.restore(wrong)
