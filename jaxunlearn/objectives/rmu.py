"""RMU, representation misdirection for unlearning (Li et al. 2024, "The WMDP Benchmark").

  rmu  gamma * A(h_theta(forget), c) + alpha * R
       A(h, g) = mean_i [ sum_{t in ans_i} mean_d (h[i,t,d] - g[i,t,d])^2 / |ans_i| ]
       c = steering_coeff * u / ||u||, u ~ Uniform[0, 1)^D fixed by `seed`
       R = A(h_theta(retain), h_ref(retain))  ("embed_diff", default), or the retain NLL / KL

h is the residual stream at the output of decoder layer `layer` (0-indexed: open-unlearning's
module `model.layers.7` is layer=7), i.e. apply.hidden(..., num_layers=layer + 1); ans_i are the
positions whose own label is scored (labels != -100, unshifted, as open-unlearning's mask).
Samples without a scored token are left out of the mean. (WMDP's own code takes the plain MSE
over every position of its inputs, trains the MLP down-projections of layers 5-7 only, and uses
steering 6.5 with retain weight 1200 for Zephyr-7B.)
`trainable` is a regular expression matched (fullmatch) against parameter paths such as
"layers.7.mlp.down_proj.kernel": gradients of the other parameters are stopped inside the loss.
Parameters stored stacked over layers ("layers.mlp.down_proj.kernel" [L, ...]) are matched slice by
slice under the same per-layer names, so one pattern serves both layouts.
open-unlearning's config trains everything (".*", its default here); the WMDP code trains
"layers\\.(5|6|7)\\.mlp\\.down_proj\\.kernel". A stopped gradient is zero, but an optimiser with
decoupled weight decay would still move those parameters: `jaxunlearn unlearn` (method=rmu) also masks
the optimiser's updates (`optim.keep_frozen` with `trainable_mask`), so frozen parameters stay put; a
train step built by hand with this objective needs the same wrapping.
Source: open-unlearning src/trainer/unlearn/rmu.py (loss, mask and defaults of configs/trainer/RMU.yaml:
layer 7, steering_coeff 2, gamma 1, alpha 1, retain EMBED_DIFF); centerforaisafety/wmdp rmu/unlearn.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.objectives.common import masked_mean, require
from jaxunlearn.objectives.registry import register
from jaxunlearn.objectives.terms import NLL_REDUCTIONS, RETAIN_LOSSES, check_choice, retain_term
from jaxunlearn.ops import IGNORE
from jaxunlearn.optim import where_kept

RMU_RETAIN_LOSSES = ("embed_diff",) + RETAIN_LOSSES


def param_path(path) -> str:
    """'layers.7.mlp.down_proj.kernel' for a pytree key path (a trailing '.value' of nnx state dropped)."""
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    return name[: -len(".value")] if name.endswith(".value") else name


def leaf_mask(name: str, leaf, regex: re.Pattern):
    """True/False for a parameter, or a [num_layers] bool array for one stored stacked over layers
    ('layers.<rest>' with a leading layer axis), whose slice i is named 'layers.<i>.<rest>'."""
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 1 and not parts[1].isdigit():
        rest = ".".join(parts[1:])
        return np.array([bool(regex.fullmatch(f"layers.{i}.{rest}")) for i in range(leaf.shape[0])])
    return bool(regex.fullmatch(name))


def trainable_mask(params, pattern: str):
    """Pytree of leaf_mask values: which parameters (or layer slices of stacked ones) `pattern` selects."""
    regex = re.compile(pattern)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: leaf_mask(param_path(path), leaf, regex), params)


def freeze_others(params, pattern: str):
    """params with stop_gradient on every parameter (or layer slice) that `pattern` does not select."""
    masks = trainable_mask(params, pattern)
    if not any(np.any(m) for m in jax.tree.leaves(masks)):
        raise ValueError(f"objective 'rmu': trainable {pattern!r} matches no parameter")

    return jax.tree.map(lambda p, keep: where_kept(keep, p, jax.lax.stop_gradient(p)), params, masks)


def control_vector(dim: int, steering_coeff: float, seed: int) -> jax.Array:
    """steering_coeff times a unit vector drawn uniformly from [0, 1)^dim (fixed by seed)."""
    u = jax.random.uniform(jax.random.key(seed), (dim,), jnp.float32)
    return steering_coeff * u / jnp.linalg.norm(u)


def activation_loss(acts: jax.Array, goal: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample mean over scored positions of the feature-mean squared error, averaged over samples."""
    mask = (labels != IGNORE).astype(jnp.float32)
    per_position = ((acts.astype(jnp.float32) - goal.astype(jnp.float32)) ** 2).mean(-1)
    count = mask.sum(-1)
    return masked_mean((per_position * mask).sum(-1) / jnp.maximum(count, 1.0), count > 0)


def layer_output(apply, params, data, layer: int) -> jax.Array:
    return apply.hidden(params, data["input_ids"], data["attention_mask"], num_layers=layer + 1)


@register("rmu")
def rmu(layer: int = 7, steering_coeff: float = 2.0, gamma: float = 1.0, alpha: float = 1.0,
        retain_loss: str = "embed_diff", trainable: str = ".*", seed: int = 0, nll_reduction: str = "token"):
    """Steer layer `layer`'s forget activations to a fixed random vector; keep retain activations."""
    check_choice("rmu", "retain_loss", retain_loss, RMU_RETAIN_LOSSES)
    check_choice("rmu", "nll_reduction", nll_reduction, NLL_REDUCTIONS)
    if layer < 0:
        raise ValueError(f"objective 'rmu': layer must be >= 0, got {layer}")
    try:
        re.compile(trainable)
    except re.error as e:
        raise ValueError(f"objective 'rmu': trainable {trainable!r} is not a regular expression ({e})") from None

    def objective(params, ref_params, batch, apply):
        forget = require(batch, "forget", "rmu")
        if trainable != ".*":
            params = freeze_others(params, trainable)
        acts = layer_output(apply, params, forget, layer)
        goal = control_vector(acts.shape[-1], steering_coeff, seed)
        loss = activation_loss(acts, goal, forget["labels"])
        metrics = {"forget_rmu": loss}
        if alpha == 0:
            return gamma * loss, metrics
        if retain_loss == "embed_diff":
            retain = require(batch, "retain", "rmu")
            ref_acts = jax.lax.stop_gradient(layer_output(apply, ref_params, retain, layer))
            value = activation_loss(layer_output(apply, params, retain, layer), ref_acts, retain["labels"])
            metrics["retain_embed_diff"] = value
        else:
            value, retain_metrics = retain_term(params, ref_params, batch, apply, "rmu", retain_loss, nll_reduction)
            metrics.update(retain_metrics)
        return gamma * loss + alpha * value, metrics

    return objective
