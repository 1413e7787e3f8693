"""Mesh construction, logical-axis rules with divisibility fallback, model parameter placement."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from flax import nnx

from jaxunlearn.models import ModelConfig, init_model, param_logical_axes, split_params
from jaxunlearn.sharding import (
    MeshError,
    batch_sharding,
    check_batch_divisible,
    logical_to_spec,
    make_mesh,
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
    assert logical_to_spec(("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
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
