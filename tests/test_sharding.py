"""Mesh construction, logical-axis rules with divisibility fallback, model parameter placement."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from flax import nnx

from jaxunlearn.models import ModelConfig, init_model, param_logical_axes, split_params
from jaxunlearn.sharding import (
    ACTIVATION_RULES,
    MeshError,
    batch_sharding,
    check_batch_divisible,
    constrain,
    logical_to_spec,
    make_mesh,
    mesh_context,
    param_shardings,
    replicated,
    shard_params,
)


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(make_mesh(data=2, fsdp=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(data=-1, fsdp=4).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert make_mesh(1, 1, 1).devices.size == 1
    assert make_mesh(data=2, devices=jax.devices()[2:4]).devices.flatten().tolist() == jax.devices()[2:4]
    with pytest.raises(MeshError, match="needs 16 devices, only 8"):
        make_mesh(data=4, fsdp=4)
    with pytest.raises(MeshError, match="not divisible by 3"):
        make_mesh(data=-1, tensor=3)
    with pytest.raises(MeshError, match="at most one axis"):
        make_mesh(data=-1, fsdp=-1)


def test_logical_rules_and_fallback():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    # the vocabulary dimension claims fsdp x tensor first, wherever it sits (embedding table and LM head)
    assert logical_to_spec(("vocab", "embed"), (64, 32), mesh) == P(("fsdp", "tensor"), None)
    assert logical_to_spec(("embed", "vocab"), (32, 64), mesh) == P(None, ("fsdp", "tensor"))
    assert logical_to_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == P("fsdp", "tensor", None)
    # odd sizes are not divisible by 2: replicated on that dimension
    assert logical_to_spec(("vocab", "embed"), (65, 32), mesh) == P(None, "fsdp")
    # a mesh axis is used at most once per array
    assert logical_to_spec(("heads", "mlp"), (4, 8), mesh) == P("tensor", None)
    # size-1 mesh axes are left out
    assert logical_to_spec(("embed", "mlp"), (32, 8), make_mesh(data=8)) == P(None, None)
    with pytest.raises(ValueError, match="unknown logical axis 'rows'"):
        logical_to_spec(("rows",), (4,), mesh)
    with pytest.raises(ValueError, match="do not match array shape"):
        logical_to_spec(("embed",), (4, 4), mesh)


def test_model_params_placed_and_batch_sharding():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg = ModelConfig.preset("tiny-llama", vocab_size=66)  # 66 % 4 != 0 but % 2 == 0
    _, abstract = split_params(nnx.eval_shape(lambda: init_model(cfg)))  # shapes only: eager init is slow on CPU
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)
    axes = param_logical_axes(params)
    placed = shard_params(params, axes, mesh)
    shardings = param_shardings(axes, mesh, params)
    assert jax.tree.structure(placed) == jax.tree.structure(params) == jax.tree.structure(shardings)
    specs = [x.sharding.spec for x in jax.tree.leaves(placed)]
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), placed, params)
    # every array's shards are even (divisibility respected)
    for x in jax.tree.leaves(placed):
        shapes = {s.data.shape for s in x.addressable_shards}
        assert len(shapes) == 1

    bs = batch_sharding(mesh)
    x = jax.device_put(np.zeros((8, 16), np.int32), bs)
    assert x.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 16)}
    assert replicated(mesh).spec == P()
    check_batch_divisible(8, mesh)
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by data\\*fsdp=4"):
        check_batch_divisible(6, mesh)
    with pytest.raises(ValueError, match="logical axes tree has"):
        param_shardings(axes, mesh, {"x": np.zeros(3)})


def test_activation_rules_and_constrain_without_mesh():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    act = ("batch", "length", "act_embed")
    assert logical_to_spec(act, (8, 5, 32), mesh, ACTIVATION_RULES) == P(("data", "fsdp"), None, None)
    # logits: vocabulary-parallel over fsdp x tensor, the batch over data only
    assert logical_to_spec(("batch", "length", "vocab"), (8, 5, 64), mesh, ACTIVATION_RULES) == P("data", None, ("fsdp", "tensor"))
    # a batch not divisible by data*fsdp stays replicated; size-1 axes drop out of the tuple
    assert logical_to_spec(act, (6, 5, 32), mesh, ACTIVATION_RULES) == P(None, None, None)
    assert logical_to_spec(act, (6, 5, 32), make_mesh(data=2, fsdp=1, tensor=4), ACTIVATION_RULES) == P("data", None, None)
    x = np.ones((4, 3), np.float32)
    assert constrain(x, ("batch", "act_embed")) is x  # no mesh set: nothing to pin
    with mesh_context(None):
        assert constrain(x, ("batch", "act_embed")) is x


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_mox_step_compiles_without_involuntary_rematerialization(shape, capfd):
    """The model pins its activations (batch over data x fsdp) when given the mesh, so XLA's partitioner
    never falls back to replicating a tensor (its 'Involuntary full rematerialization' warning) in a MOX
    train step, FSDP-8 or data x fsdp x tensor."""
    import jax.numpy as jnp

    from jaxunlearn.models import make_apply
    from jaxunlearn.objectives import get_objective
    from jaxunlearn.optim import make_optimizer
    from jaxunlearn.train import make_train_step

    mesh = make_mesh(*shape)
    cfg = ModelConfig.preset("tiny-llama", vocab_size=256, remat="full")
    graphdef, abstract = split_params(nnx.eval_shape(lambda: init_model(cfg)))
    shardings = param_shardings(param_logical_axes(abstract), mesh, abstract)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    optimizer, _ = make_optimizer(1e-3, 10, 1)
    apply = make_apply(graphdef, mesh)
    step = make_train_step(get_objective("mox"), apply, optimizer, mesh, shardings, params=params)
    part = {k: jax.ShapeDtypeStruct((16, 32), jnp.int32) for k in ("input_ids", "attention_mask", "labels")}
    lowered = step.lower(params, jax.eval_shape(optimizer.init, params), {"forget": part, "retain": part}, params)
    assert "sharding_constraint" in lowered.as_text()
    capfd.readouterr()
    lowered.compile()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
