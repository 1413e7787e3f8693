"""Device mesh and where every array lives.

Mesh axes are ("data", "fsdp", "tensor"):
  data    pure data parallelism (parameters replicated across it)
  fsdp    data parallelism with parameters sharded along their "embed" dimension
  tensor  model parallelism over the wide dimensions (mlp, heads, kv_heads, vocab)
The vocabulary dimension (embedding table, LM head, logits) is split over fsdp x tensor (FIRST_AXES).

The mesh uses `AxisType.Auto` on every axis: shardings are stated at the jit boundary
(in_shardings / out_shardings) and XLA propagates them inside, which is what a
(params, opt_state, batch, reference) -> (...) step needs. `Explicit` axes would make the
sharding part of every intermediate's type and require annotations inside the model.

Logical axis names come from `jaxunlearn.models.param_logical_axes`; `LOGICAL_RULES` maps them
to mesh axes. A dimension whose size is not divisible by its mesh axis size, or whose mesh
axis is already used by an earlier dimension of the same array, stays replicated.

Stacked layer parameters carry the logical axis "layers" first; it is never sharded.

Batches are sharded over ("data", "fsdp") on their leading dimension. Inside the model,
`constrain` pins activations by `ACTIVATION_RULES` (batch over ("data", "fsdp"), hidden features
replicated, heads/mlp over "tensor"; logits vocab-sharded over fsdp x tensor, batch over "data") against the mesh of the tracing context, which
`mesh_context(mesh)` sets (models.make_apply(graphdef, mesh) does); with no mesh set it does
nothing, so the model also runs unsharded (tests, generation).

Public: make_mesh, LOGICAL_RULES, ACTIVATION_RULES, logical_to_spec, param_shardings,
shard_params, batch_sharding, replicated, check_batch_divisible, constrain, mesh_context.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxunlearn.errors import JaxunlearnError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "embed": "fsdp",
    "vocab": ("fsdp", "tensor"),
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
}

# The vocabulary dimension (embedding table, LM head, logits) is split over fsdp x tensor and claims
# those axes first: the vocabulary matrices stay vocab-sharded (never all-gathered), the head runs
# vocabulary-parallel (its hidden-state input gathered over fsdp, its logits and weight gradient
# vocab-sharded) and logits are batch-sharded over "data" only. Not divisible: the usual rules apply.
FIRST_AXES = ("vocab",)

# activations: a rule may name several mesh axes (a tuple), split over together
ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "vocab": ("fsdp", "tensor"),
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
}


class MeshError(JaxunlearnError, ValueError):
    """The requested mesh shape does not fit the available devices."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types; one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: sizes must be positive or -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise MeshError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    total = int(np.prod(sizes))
    if total > len(devices):
        raise MeshError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {total} devices, only {len(devices)} available")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:total])


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES
) -> P:
    """PartitionSpec for one array from its logical axis names and shape."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match array shape {tuple(shape)}")
    for name in axes:
        if name is not None and name not in rules:
            raise ValueError(f"unknown logical axis {name!r} (known: {', '.join(sorted(rules))})")
    used: set[str] = set()
    spec: list = [None] * len(axes)
    # dimensions named in FIRST_AXES claim their mesh axes before the others, whatever their position
    for i in sorted(range(len(axes)), key=lambda i: axes[i] not in FIRST_AXES):
        rule = rules.get(axes[i]) if axes[i] is not None else None
        mesh_axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ())
                          if a not in used and mesh.shape[a] > 1)
        if mesh_axes and not shape[i] % int(np.prod([mesh.shape[a] for a in mesh_axes])):
            spec[i] = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
            used.update(mesh_axes)
    return P(*spec)


def _is_axes_leaf(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_shardings(axes_tree, mesh: Mesh, params=None, rules: Mapping[str, str | None] = LOGICAL_RULES):
    """NamedSharding tree with the structure of `params` (or of `axes_tree` when params is None).

    `params` (arrays or jax.ShapeDtypeStruct leaves) supplies the shapes used for the
    divisibility fallback; without it every named dimension is assumed divisible.
    """
    axes_leaves = jax.tree.leaves(axes_tree, is_leaf=_is_axes_leaf)
    if params is None:
        specs = [P(*(rules.get(a) if a is not None else None for a in ax)) for ax in axes_leaves]
        treedef = jax.tree.structure(axes_tree, is_leaf=_is_axes_leaf)
        return jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in specs])
    leaves, treedef = jax.tree.flatten(params)
    if len(leaves) != len(axes_leaves):
        raise ValueError(f"logical axes tree has {len(axes_leaves)} entries but params have {len(leaves)} arrays")
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    out = []
    for path, leaf, ax in zip(paths, leaves, axes_leaves):
        try:
            out.append(NamedSharding(mesh, logical_to_spec(ax, np.shape(leaf), mesh, rules)))
        except ValueError as e:
            raise ValueError(f"parameter {path}: {e}") from None
    return jax.tree.unflatten(treedef, out)


def shard_params(params, axes_tree, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES):
    """Place a parameter pytree on the mesh according to its logical axes."""
    return jax.device_put(params, param_shardings(axes_tree, mesh, params, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ("data", "fsdp"); other dimensions replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated on every device of the mesh."""
    return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dimension is split."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raise a clear error when a global batch cannot be split evenly over the mesh."""
    n = batch_shards(mesh)
    if batch_size % n:
        raise MeshError(f"{what}={batch_size} is not divisible by data*fsdp={n} of the mesh {dict(mesh.shape)}")


def mesh_context(mesh: Mesh | None):
    """Context in which `constrain` pins activations to `mesh` (usable while tracing); none for None."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Mapping[str, Any] = ACTIVATION_RULES) -> jax.Array:
    """`x` with a sharding constraint from its logical activation axes, against the context mesh
    (`mesh_context`); `x` unchanged when no ("data", "fsdp", "tensor") mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))
