"""model.reference_dtype: the frozen reference is held in bf16 during unlearning, after its hash
was checked on the stored checkpoint; extrapolation still uses the stored reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import extrapolate as ex
from jaxunlearn import runner
from jaxunlearn.config import ConfigError, from_dict

TINY = {
    "model": {"reference_dtype": "bfloat16"},
    "data": {"synthetic_entities": 6, "max_len": 64, "buckets": [64]},
    "train": {"batch_size": 8, "epochs": 1, "max_steps": 2, "lr": 1e-3, "loss_chunk": 16},
    "method": {"name": "mox", "alpha": 2.0},
    "checkpoint": {"async_save": False},
}


def test_bf16_reference_in_training_stored_reference_for_extrapolation(tmp_path, monkeypatch):
    seen = {}
    real_train_stage = runner.train_stage

    def train_stage(run, cfg, setup, stage, start, ref_params):
        seen["ref"] = {x.dtype for x in jax.tree.leaves(ref_params)}
        seen["start"] = {x.dtype for x in jax.tree.leaves(start)}
        seen["sharding"] = [x.sharding for x in jax.tree.leaves(ref_params)]
        seen["setup"] = [s for s in jax.tree.leaves(setup.shardings)]
        return real_train_stage(run, cfg, setup, stage, start, ref_params)

    monkeypatch.setattr(runner, "train_stage", train_stage)
    run = runner.unlearn(from_dict(TINY), tmp_path / "run", "random")
    assert seen["ref"] == {jnp.dtype(jnp.bfloat16)} and seen["start"] == {jnp.dtype(jnp.float32)}
    assert seen["sharding"] == seen["setup"]
    _, ref, meta = runner.load_run_params(run, "reference")  # stored at full precision, hash verified
    assert {x.dtype for x in jax.tree.leaves(ref)} == {jnp.dtype(jnp.float32)}
    _, mem, _ = runner.load_run_params(run, "memorized")
    _, forget, _ = runner.load_run_params(run, "forget")
    want = ex.extrapolate(ref, mem, 2.0, donate=False)
    for got, exp in zip(jax.tree.leaves(forget), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, exp)


def test_cast_reference_keeps_the_object_when_nothing_to_cast():
    tree = {"w": jnp.ones((2, 2), jnp.float32), "n": jnp.arange(3)}
    assert runner.cast_reference(tree, None) is tree
    assert runner.cast_reference(tree, "float32") is tree
    cast = runner.cast_reference(tree, "bfloat16")
    assert cast["w"].dtype == jnp.bfloat16 and cast["n"].dtype == tree["n"].dtype


def test_reference_dtype_config_errors():
    with pytest.raises(ConfigError, match="model.reference_dtype: expected null or one of"):
        from_dict({"model": {"reference_dtype": "int8"}})
    with pytest.raises(ConfigError, match="reference_dtype: method.momentum"):
        from_dict({"model": {"reference_dtype": "bfloat16"}, "method": {"name": "mox", "momentum": True}})
    with pytest.raises(ConfigError, match="train.loss_chunk: must be >= 0"):
        from_dict({"train": {"loss_chunk": -1}})
