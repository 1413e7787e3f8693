"""Extrapolation: exact formula on random sharded pytrees, donation, shardings kept, momentum, sweep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxunlearn.extrapolate import RULES, UnknownRuleError, alpha_sweep, extrapolate, momentum_update, register_rule
from jaxunlearn.sharding import make_mesh


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, fsdp=2, tensor=2)


def random_trees(mesh, seed):
    """Two random pytrees (nested dict, mixed shardings and dtypes) on the 8-device mesh."""
    rng = np.random.default_rng(seed)
    layout = {
        "embed": ((16, 8), P("tensor", "fsdp")),
        "layers": {"w": ((8, 12), P("fsdp", "tensor")), "b": ((12,), P())},
        "scale": ((4, 4), P(("data", "fsdp"), None)),
    }

    def build():
        return jax.tree.map(
            lambda spec: jax.device_put(
                rng.standard_normal(spec[0]).astype(np.float32), NamedSharding(mesh, spec[1])
            ),
            layout,
            is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[1], P),
        )

    return build(), build()


def host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)  # a copy: views would pin the buffers


def test_extrapolate_exact_donates_and_keeps_sharding(mesh):
    ref, mem = random_trees(mesh, 0)
    ref_np, mem_np = host(ref), host(mem)
    shardings = jax.tree.map(lambda x: x.sharding, mem)
    alpha = 4.0
    out = extrapolate(ref, mem, alpha)
    expected = jax.tree.map(lambda r, m: np.float32(r) + np.float32(alpha) * (np.float32(r) - np.float32(m)), ref_np, mem_np)
    jax.tree.map(lambda o, e: np.testing.assert_array_equal(np.asarray(o), e), out, expected)
    # result keeps each parameter's sharding; mem was donated, ref untouched
    jax.tree.map(lambda o, s: o.sharding.is_equivalent_to(s, o.ndim) or pytest.fail(f"{o.sharding} != {s}"), out, shardings)
    assert all(x.is_deleted() for x in jax.tree.leaves(mem))
    assert not any(x.is_deleted() for x in jax.tree.leaves(ref))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), ref, ref_np)
    # fixed point: a memorised model equal to the reference extrapolates to the reference (alpha=0 is refused)
    ref2, _ = random_trees(mesh, 1)
    same = extrapolate(ref2, jax.tree.map(jnp.copy, ref2), 3.0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), same, ref2)


def test_bfloat16_params_keep_dtype(mesh):
    ref, mem = random_trees(mesh, 2)
    ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ref)
    mem = jax.tree.map(lambda x: x.astype(jnp.bfloat16), mem)
    expected = jax.tree.map(
        lambda r, m: (np.asarray(r, np.float32) + 2.0 * (np.asarray(r, np.float32) - np.asarray(m, np.float32))), ref, mem
    )
    out = extrapolate(ref, mem, 2.0, donate=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    assert not any(x.is_deleted() for x in jax.tree.leaves(mem))
    jax.tree.map(lambda o, e: np.testing.assert_allclose(np.asarray(o, np.float32), e, rtol=1e-2, atol=1e-2), out, expected)


def test_momentum_and_sweep(mesh):
    ref, mem = random_trees(mesh, 3)
    ref_np, mem_np = host(ref), host(mem)
    alpha, eta = 2.0, 0.675
    first = momentum_update(None, ref, mem, alpha, eta)
    extrap_np = jax.tree.map(lambda r, m: r + np.float32(alpha) * (r - m), ref_np, mem_np)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=1e-6, atol=1e-6), first, extrap_np)
    assert not any(x.is_deleted() for x in jax.tree.leaves(mem))  # training goes on with mem

    _, mem_b = random_trees(mesh, 4)
    mem_b_np = host(mem_b)
    first_np = host(first)
    second = momentum_update(first, ref, mem_b, alpha, eta)
    expected = jax.tree.map(
        lambda r, m, p: np.float32(eta) * (r + np.float32(alpha) * (r - m)) + np.float32(1 - eta) * p, ref_np, mem_b_np, first_np
    )
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=1e-6, atol=1e-6), second, expected)
    assert all(x.is_deleted() for x in jax.tree.leaves(first))  # previous forget model donated

    alphas = [0.5, 1.0, 4.0]
    got = dict(alpha_sweep(ref, mem, alphas))
    assert list(got) == alphas
    for a in alphas:
        exp = jax.tree.map(lambda r, m: r + np.float32(a) * (r - m), ref_np, mem_np)
        jax.tree.map(lambda x, e: np.testing.assert_allclose(np.asarray(x), e, rtol=1e-6, atol=1e-6), got[a], exp)
    assert not any(x.is_deleted() for x in jax.tree.leaves(mem) + jax.tree.leaves(ref))


def test_rule_registry_and_errors(mesh):
    ref, mem = random_trees(mesh, 5)
    with pytest.raises(UnknownRuleError, match="unknown extrapolation rule 'nope'"):
        extrapolate(ref, mem, 1.0, rule="nope")
    name = "test_sign_step"
    if name not in RULES:

        @register_rule(name)
        def sign_step(r, m, alpha):
            return r + alpha * jnp.sign(r - m)

    out = extrapolate(ref, mem, 0.5, rule=name, donate=False)
    jax.tree.map(
        lambda o, r, m: np.testing.assert_allclose(np.asarray(o), np.asarray(r) + 0.5 * np.sign(np.asarray(r) - np.asarray(m)), rtol=1e-6),
        out, ref, mem,
    )
    bad = dict(mem)
    bad["embed"] = jnp.zeros((3, 3))
    with pytest.raises(ValueError, match=r"\['embed'\] has shape \(16, 8\)"):
        extrapolate(ref, bad, 1.0)
    with pytest.raises(ValueError, match="eta must be in"):
        momentum_update(ref, ref, mem, 1.0, 1.5)
