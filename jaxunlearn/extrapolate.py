"""Extrapolation from the memorised model through the reference: the forget model.

    theta_for = theta_ref + alpha * (theta_ref - theta_mem)        (rule "linear", the paper's)

All functions are jitted tree_maps over parameter pytrees; they work on sharded arrays and
the result keeps the parameters' shardings (elementwise ops propagate them). Arithmetic is
done in float32 and cast back to each parameter's dtype. alpha and eta are traced scalars,
so a sweep over alphas compiles once.

  extrapolate(ref, mem, alpha, rule="linear")     donates `mem` (its buffers become the result)
  momentum_update(prev, ref, mem, alpha, eta)     eta * extrapolate(ref, mem, alpha) + (1 - eta) * prev;
                                                  donates `prev`; `mem` is kept (training goes on);
                                                  prev=None gives the plain extrapolation (the first
                                                  on-the-fly forget model)
  alpha_sweep(ref, mem, alphas)                   yields (alpha, forget) without donating anything

Extension point: RULES maps a name to an elementwise rule(ref, mem, alpha) on float32 arrays;
add one with `@register_rule("name")`.

alpha must be a finite number > 0 (config.check_alpha); anything else is a ConfigError before
any arithmetic, so no NaN/inf forget model can be written.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp

from jaxunlearn.config import check_alpha
from jaxunlearn.errors import JaxunlearnError
from jaxunlearn.registry import Registry

Rule = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
class UnknownRuleError(JaxunlearnError, ValueError):
    """No extrapolation rule of that name."""


RULES = Registry("extrapolation rule", UnknownRuleError)


def register_rule(name: str):
    """Decorator adding an elementwise extrapolation rule to RULES."""
    return lambda rule: RULES.add(name, rule)


@register_rule("linear")
def linear(ref: jax.Array, mem: jax.Array, alpha: jax.Array) -> jax.Array:
    """ref + alpha * (ref - mem)."""
    return ref + alpha * (ref - mem)


def get_rule(name: str) -> Rule:
    return RULES.lookup(name)


def _apply_rule(rule: Rule, ref, mem, alpha):
    def leaf(r, m):
        return rule(r.astype(jnp.float32), m.astype(jnp.float32), alpha).astype(r.dtype)

    return jax.tree.map(leaf, ref, mem)


def _check_trees(ref, mem, what: str) -> None:
    a, b = jax.tree.structure(ref), jax.tree.structure(mem)
    if a != b:
        raise ValueError(f"{what}: reference and memorised parameter trees differ in structure")
    for path_r, r, m in zip(
        (jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(ref)[0]),
        jax.tree.leaves(ref),
        jax.tree.leaves(mem),
    ):
        if r.shape != m.shape:
            raise ValueError(f"{what}: parameter {path_r} has shape {r.shape} in the reference but {m.shape} in the other model")


@functools.partial(jax.jit, static_argnames=("rule",), donate_argnums=(1,))
def _extrapolate_donating(ref, mem, alpha, rule: str):
    return _apply_rule(RULES[rule], ref, mem, alpha)


@functools.partial(jax.jit, static_argnames=("rule",))
def _extrapolate_keeping(ref, mem, alpha, rule: str):
    return _apply_rule(RULES[rule], ref, mem, alpha)


@functools.partial(jax.jit, static_argnames=("rule",), donate_argnums=(0,))
def _momentum(prev, ref, mem, alpha, eta, rule: str):
    new = _apply_rule(RULES[rule], ref, mem, alpha)
    return jax.tree.map(
        lambda n, p: (eta * n.astype(jnp.float32) + (1.0 - eta) * p.astype(jnp.float32)).astype(p.dtype), new, prev
    )


def extrapolate(ref, mem, alpha: float, rule: str = "linear", donate: bool = True):
    """The forget model for one alpha; `mem` is donated (deleted) unless donate=False."""
    alpha = check_alpha(alpha)
    get_rule(rule)
    _check_trees(ref, mem, "extrapolate")
    fn = _extrapolate_donating if donate else _extrapolate_keeping
    return fn(ref, mem, jnp.float32(alpha), rule=rule)


def momentum_update(prev_forget, ref, mem, alpha: float, eta: float, rule: str = "linear"):
    """eta * extrapolate(ref, mem, alpha) + (1 - eta) * prev_forget (prev_forget is donated)."""
    alpha = check_alpha(alpha)
    get_rule(rule)
    _check_trees(ref, mem, "momentum_update")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"momentum_update: eta must be in [0, 1], got {eta}")
    if prev_forget is None:
        return _extrapolate_keeping(ref, mem, jnp.float32(alpha), rule=rule)
    _check_trees(ref, prev_forget, "momentum_update")
    return _momentum(prev_forget, ref, mem, jnp.float32(alpha), jnp.float32(eta), rule=rule)


def alpha_sweep(ref, mem, alphas: Iterable[float], rule: str = "linear") -> Iterator[tuple[float, object]]:
    """Yield (alpha, forget model) for each alpha; neither input is donated."""
    alphas = [check_alpha(a) for a in alphas]
    get_rule(rule)
    _check_trees(ref, mem, "alpha_sweep")
    for alpha in alphas:
        yield float(alpha), _extrapolate_keeping(ref, mem, jnp.float32(alpha), rule=rule)
