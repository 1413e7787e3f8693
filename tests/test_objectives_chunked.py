"""Chunked vocabulary losses (objectives.common.per_token with a loss_chunk) equal the full-logit ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.models import ModelConfig, init_model, make_apply, split_params
from jaxunlearn.objectives import get_objective
from jaxunlearn.objectives.common import ChunkedApply, label_logp, loss_chunk_of, per_token, with_loss_chunk
from jaxunlearn.ops import IGNORE

V = 97


def make_batch(seed, B=4, T=13, prompt=4):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[-1, T - 3:] = 0  # right padding
    mask[-2, :2] = 0  # left padding
    labels = np.where(mask == 1, ids, IGNORE)
    labels[:, :prompt] = IGNORE
    return {k: jnp.asarray(v) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int32)}.items()}


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny-llama", vocab_size=V)
    graphdef, ref = split_params(init_model(cfg, seed=0))
    _, params = split_params(init_model(cfg, seed=1))
    batch = {"forget": make_batch(0), "retain": make_batch(1), "train": make_batch(2)}
    return make_apply(graphdef), params, ref, batch


def loss_and_grad(name, apply, params, ref, batch):
    obj = get_objective(name)
    fn = jax.jit(jax.value_and_grad(lambda p: obj(p, ref, batch, apply)[0]))
    return fn(params)


# T-1 = 12 positions: divisible by 4, not by 5
@pytest.mark.parametrize("name,chunk", [("mox", 4), ("mox", 5), ("npo", 5), ("graddiff", 5), ("finetune", 5)])
def test_chunked_loss_and_grads_equal_full(model, name, chunk):
    apply, params, ref, batch = model
    full_loss, full_grads = loss_and_grad(name, with_loss_chunk(apply, 0), params, ref, batch)
    loss, grads = loss_and_grad(name, with_loss_chunk(apply, chunk), params, ref, batch)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5, atol=1e-6)
    for g, fg in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(g, fg, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(jax.tree.leaves(full_grads)[0]).sum()) > 0


def test_chunked_values_per_position(model):
    """Every position's value, the padded tail included, is that of the full path."""
    apply, params, _, batch = model
    full = per_token(apply, params, batch["forget"], label_logp)
    chunked = jax.jit(lambda p: per_token(with_loss_chunk(apply, 5), p, batch["forget"], label_logp))(params)
    assert chunked.shape == full.shape == (4, 12)
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6)


def test_chunk_holds_one_chunk_of_logits(model):
    """The compiled chunked loss never materialises a [B, T-1, V] float32 array; the full one does."""
    apply, params, _, batch = model
    data = {k: jnp.tile(v, (1, 40)) for k, v in batch["forget"].items()}  # T = 520, V = 97

    def hlo(chunk):
        f = jax.jit(jax.grad(lambda p: per_token(with_loss_chunk(apply, chunk), p, data, label_logp).sum()))
        return f.lower(params).as_text()

    full_shape = "tensor<4x519x97xf32>"
    assert full_shape in hlo(0)
    chunked = hlo(64)
    assert full_shape not in chunked and "tensor<4x520x97xf32>" not in chunked and "tensor<4x64x97xf32>" in chunked


def test_plain_function_and_wrapper():
    """A plain apply function has no chunk size; the wrapper forwards calls and replaces an earlier size."""
    plain = lambda p, ids, mask: p  # noqa: E731
    assert loss_chunk_of(plain) == 0
    wrapped = with_loss_chunk(with_loss_chunk(plain, 8), 16)
    assert loss_chunk_of(wrapped) == 16 and wrapped.apply is plain and wrapped(3, None, None) == 3
    assert not hasattr(wrapped, "hidden")


def test_chunked_on_a_mesh_with_sharded_parameters_equals_full(model):
    """The sharded path (the model's activation constraints, parameters and batch split over
    fsdp=8) gives the single-device full-logit loss and gradients."""
    from jaxunlearn.models import param_logical_axes
    from jaxunlearn.sharding import batch_sharding, make_mesh, param_shardings

    apply, params, ref, _ = model
    mesh = make_mesh(data=1, fsdp=8)
    shardings = param_shardings(param_logical_axes(params), mesh, params)
    batch = {"forget": make_batch(3, B=8), "retain": make_batch(4, B=8)}
    full_loss, full_grads = loss_and_grad("mox", with_loss_chunk(apply, 0), params, ref, batch)
    sharded = with_loss_chunk(make_apply(apply.graphdef, mesh), 5)
    put = lambda tree, s: jax.device_put(tree, s)  # noqa: E731
    loss, grads = loss_and_grad("mox", sharded, put(params, shardings), put(ref, shardings),
                                put(batch, batch_sharding(mesh)))
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5, atol=1e-6)
    for g, fg in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(g, fg, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mox", "mox_npo", "mox_targeted"])
def test_mox_joint_pass_with_unequal_lengths_equals_full(model, name):
    """The MOX objectives run forget, (target) and retain through the layers in one pass
    (objectives.common.joint_hidden, shorter batches padded on the right); loss and gradients are
    those of separate full passes."""
    apply, params, ref, _ = model
    batch = {"forget": make_batch(5, B=2, T=11), "retain": make_batch(6, B=4, T=17), "target": make_batch(7, B=2, T=9)}
    full_loss, full_grads = loss_and_grad(name, with_loss_chunk(apply, 0), params, ref, batch)
    counting = CountingApply(with_loss_chunk(apply, 4).apply, 4)
    loss, grads = loss_and_grad(name, counting, params, ref, batch)
    assert counting.trained_passes == 1  # the trained model's layers ran once for all batches
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5, atol=1e-6)
    for g, fg in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(g, fg, rtol=1e-4, atol=1e-6)


class CountingApply(ChunkedApply):
    """Counts the passes of the differentiated (traced) parameters through the layers."""

    def __init__(self, apply, loss_chunk):
        super().__init__(apply, loss_chunk)
        self.trained_passes = 0

    def hidden(self, params, *args, **kwargs):
        self.trained_passes += isinstance(jax.tree.leaves(params)[0], jax.core.Tracer)
        return self.apply.hidden(params, *args, **kwargs)
