"""Time one extrapolation of a 1B-shaped parameter tree against plain device copies of the same bytes.

    python experiments/bench/extrapolate.py [--preset Llama-3.2-1B] [--dtype bfloat16|float32]
                                            [--layers N] [--repeats 3]

Builds the preset's parameter tree (Llama-3.2-1B: 1.24B parameters, layers stacked; `--layers`
shrinks it) in `--dtype` on the default device, then alternates `--repeats` times:

- extrapolate: the library's `jaxunlearn.extrapolate.extrapolate(ref, mem, 4.0)` (the public call,
  the memorised tree donated, as the runner does: the result overwrites it); reads two trees, writes one;
- copy: a plain device copy of one tree, in place like the extrapolation (`x + zero` with `x`
  donated and `zero` a traced 0, which XLA cannot drop); reads one tree, writes one;
- copy-both: the same in-place copy of two trees: every byte the extrapolation reads, written back;
- copy-new: `jnp.copy` of one tree into newly allocated buffers (adds the allocation's page faults);
- sum: `ref + mem` with `mem` donated, the cheapest rule with the extrapolation's reads and writes.

Prints each median, the ratio of the extrapolation to each of the others, XLA's memory analysis of the
compiled extrapolation (arguments, output, aliased, temporaries: no extra full copy means output ==
aliased and temporaries ~ 0) and the process's peak RSS after the extrapolations and after the
copies, plus the load average and the command. 1B bf16 needs about 3 trees (7.5 GB) of memory.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.extrapolate import _extrapolate_donating, extrapolate
from jaxunlearn.models import ModelConfig, init_model, split_params

GIB = 1 << 30
ALPHA = 4.0
TRAFFIC = {"extrapolate": 3, "copy": 2, "copy-both": 4, "copy-new": 2, "sum": 3}  # trees read + written


def abstract_tree(preset: str, layers: int | None, dtype: str):
    """The preset's parameters as ShapeDtypeStructs in `dtype` (nothing allocated)."""
    overrides = {} if layers is None else {"num_layers": layers}
    cfg = ModelConfig.preset(preset, **overrides)
    _, abstract = split_params(nnx.eval_shape(lambda: init_model(cfg)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), abstract)


@jax.jit
def _filled(abstract_like):
    """Deterministic non-constant values in place (cheap, unlike a random draw of 1B numbers)."""
    def leaf(x):
        i = jax.lax.iota(jnp.int32, x.size).reshape(x.shape) % 997
        return ((i.astype(jnp.float32) - 498.0) * 4e-5).astype(x.dtype)

    return jax.tree.map(leaf, abstract_like)


@jax.jit
def _perturbed(tree):
    return jax.tree.map(lambda x: (x.astype(jnp.float32) * 0.999 + 1e-4).astype(x.dtype), tree)


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_in_place(tree, zero):
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)


@jax.jit
def _copy_new(tree):
    return jax.tree.map(jnp.copy, tree)


@functools.partial(jax.jit, donate_argnums=(1,))
def _sum(ref, mem):
    return jax.tree.map(lambda r, m: r + m, ref, mem)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="Llama-3.2-1B")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count (smaller tree)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)

    rss_start = peak_rss_gib()
    abstract = abstract_tree(a.preset, a.layers, a.dtype)
    n_params = sum(x.size for x in jax.tree.leaves(abstract))
    tree_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    ref = jax.block_until_ready(_filled(abstract))
    print(f"{a.preset}{'' if a.layers is None else f' ({a.layers} layers)'}: {n_params / 1e9:.3f}B parameters, "
          f"{a.dtype}, {tree_bytes / GIB:.2f} GiB per tree, {len(jax.tree.leaves(abstract))} arrays, "
          f"device {jax.devices()[0].device_kind} x{len(jax.devices())}")

    mem = _perturbed(ref)
    m = _extrapolate_donating.lower(ref, mem, jnp.float32(ALPHA), rule="linear").compile().memory_analysis()
    print(f"compiled extrapolation (XLA memory analysis): arguments {m.argument_size_in_bytes / GIB:.2f} GiB, "
          f"output {m.output_size_in_bytes / GIB:.2f} GiB, aliased to arguments {m.alias_size_in_bytes / GIB:.2f} GiB, "
          f"temporaries {m.temp_size_in_bytes / 2**20:.1f} MiB")
    zero = jnp.float32(0.0)
    runs = {  # name -> fn(fresh memorised tree, a second fresh tree)
        "extrapolate": lambda mem, _: extrapolate(ref, mem, ALPHA),
        "copy": lambda mem, _: _copy_in_place(mem, zero),
        "copy-both": lambda mem, other: _copy_in_place((mem, other), zero),
        "copy-new": lambda mem, _: _copy_new(mem),
        "sum": lambda mem, _: _sum(ref, mem),
    }
    jax.block_until_ready(runs["extrapolate"](mem, None))  # compile and warm up, extrapolation alone first
    jax.block_until_ready(runs["extrapolate"](_perturbed(ref), None))
    rss_extrapolate = peak_rss_gib()
    for name, fn in runs.items():
        if name != "extrapolate":
            jax.block_until_ready(fn(_perturbed(ref), _perturbed(ref) if name == "copy-both" else None))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(a.repeats):  # alternating, each on fresh trees
        for name, fn in runs.items():
            trees = [jax.block_until_ready(_perturbed(ref)) for _ in range(2 if name == "copy-both" else 1)] + [None]
            times[name].append(timed(fn, *trees[:2]))
            del trees
    rss_all = peak_rss_gib()

    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:<12} median {med[k]:.3f} s  ({', '.join(f'{t:.3f}' for t in v)})  "
              f"{TRAFFIC[k]} trees read+written, {TRAFFIC[k] * tree_bytes / GIB / med[k]:.2f} GiB/s")
    print("extrapolate / " + ", ".join(f"{k} {med['extrapolate'] / med[k]:.2f}x" for k in med if k != "extrapolate"))
    print(f"peak RSS: {rss_start:.2f} GiB at start, {rss_extrapolate:.2f} GiB after two extrapolations "
          f"(ref + mem = {2 * tree_bytes / GIB:.2f} GiB), {rss_all:.2f} GiB after all runs (copy-both and copy-new hold a third tree)")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("command: python " + " ".join(sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
