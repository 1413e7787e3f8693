"""Per-layer <-> stacked parameter layouts, for checkpoints written before layers were stacked.

Before stacking, a model's parameters held one subtree per layer (`layers/0/mlp/up_proj/kernel`,
`layers/1/...`); now every layer parameter is one [num_layers, ...] array (`layers/mlp/up_proj/kernel`).
`unstack_layers` turns a tree in the stacked layout (arrays or abstract ShapeDtypeStructs with shardings)
into the per-layer one and `stack_layers` goes back; both act on every nnx.State inside any pytree
(parameters, or an optimiser state holding parameter-shaped States), so an old checkpoint restores onto
`unstack_layers(target)` and is then stacked (jaxunlearn.checkpoint does this on load).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS = "layers"
_PER_LAYER_PATH = re.compile(r"(^|/)layers/\d+(/|$)")


def is_per_layer(paths: Iterable[str]) -> bool:
    """True when canonical paths ('layers/0/mlp/...') show the per-layer layout."""
    return any(_PER_LAYER_PATH.search(p) for p in paths)


def _states(tree: Any, fn) -> Any:
    """Apply fn to every nnx.State in `tree` that has a LAYERS entry (other leaves unchanged)."""

    def visit(node):
        if isinstance(node, nnx.State) and LAYERS in node:
            return fn(node)
        return node

    return jax.tree.map(visit, tree, is_leaf=lambda x: isinstance(x, nnx.State))


def _slice(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    return leaf[i]


def unstack_layers(tree: Any) -> Any:
    """The per-layer layout of a stacked tree: state["layers"] becomes {0: ..., 1: ..., ...}."""

    def unstack(state: nnx.State) -> nnx.State:
        stacked = state[LAYERS]
        n = jax.tree.leaves(stacked)[0].shape[0]
        out = jax.tree.map(lambda x: x, state)
        out[LAYERS] = nnx.State({i: jax.tree.map(lambda x, i=i: _slice(x, i), stacked) for i in range(n)})
        return out

    return _states(tree, unstack)


def stack_layers(tree: Any, shardings: Any = None) -> Any:
    """The stacked layout of a per-layer tree; `shardings` (a tree like the stacked result, or None)
    places each stacked array."""

    def stack(state: nnx.State) -> nnx.State:
        per_layer = state[LAYERS]
        keys = sorted(per_layer, key=int)
        out = jax.tree.map(lambda x: x, state)
        out[LAYERS] = jax.tree.map(lambda *xs: jnp.stack(xs), *[per_layer[k] for k in keys])
        return out

    stacked = _states(tree, stack)
    if shardings is None:
        return stacked
    return jax.tree.map(lambda x, s: x if s is None else jax.device_put(x, s), stacked, shardings)
