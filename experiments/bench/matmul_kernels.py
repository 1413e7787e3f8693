"""The matrix products of the MOX step (mox_step.py's shapes) alone: XLA:CPU (jax.jit) against torch, GFLOP/s.

Why the step cannot simply be made faster than torch's on a CPU: about two thirds of the jitted step's
kernel time is these products (profile in README.md), and XLA's CPU kernels for them run slower than the
ones torch calls (oneDNN / MKL) at the same shapes. Each product is timed alone, alternating jax and
torch in one process, --rounds rounds of enough repetitions for about --seconds each; printed: the median
GFLOP/s of each side per shape, their ratio, the load average and the command. Float32; the operands are
random, laid out as the step's forward and backward products take them.

    python experiments/bench/matmul_kernels.py                   # both on every core
    taskset -c 0 python experiments/bench/matmul_kernels.py      # one core (XLA sizes its pool to it)
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import numpy as np

# name: (lhs shape, rhs shape, einsum) at mox_step.py's sizes: 8 x 128 tokens per batch, hidden 256,
# intermediate 688, vocab 8192 (1016 = 8 x 127 positions that predict a token)
PRODUCTS = {
    "head forward (hidden x head)": ((1016, 256), (256, 8192), "md,dv->mv"),
    "head backward, hidden gradient": ((1016, 8192), (256, 8192), "mv,dv->md"),
    "head backward, weight gradient": ((1016, 256), (1016, 8192), "md,mv->dv"),
    "MLP gate/up (hidden x 688)": ((1024, 256), (256, 688), "md,df->mf"),
    "MLP down (688 x hidden)": ((1024, 688), (688, 256), "mf,fd->md"),
    "attention projection": ((1024, 256), (256, 256), "md,de->me"),
}


def flops(lhs, rhs, spec) -> int:
    """2 x the product of every dimension size named in the einsum."""
    sizes = {}
    for names, shape in zip(spec.split("->")[0].split(","), (lhs, rhs)):
        sizes.update(zip(names, shape))
    return 2 * int(np.prod(list(sizes.values())))


def timed(fn, reps: int) -> float:
    """Seconds per call of fn over reps calls."""
    start = time.perf_counter()
    fn(reps)
    return (time.perf_counter() - start) / reps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3, help="about this long per side per round and shape")
    args = parser.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    rng = np.random.default_rng(0)
    print(f"{'product':34s} {'jax GFLOP/s':>12s} {'torch GFLOP/s':>14s} {'jax/torch':>10s}")
    ratios = []
    for name, (lhs_shape, rhs_shape, spec) in PRODUCTS.items():
        lhs = rng.standard_normal(lhs_shape, np.float32)
        rhs = rng.standard_normal(rhs_shape, np.float32)
        j_lhs, j_rhs = jnp.asarray(lhs), jnp.asarray(rhs)
        t_lhs, t_rhs = torch.from_numpy(lhs), torch.from_numpy(rhs)
        product = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b))
        product(j_lhs, j_rhs).block_until_ready()
        torch.einsum(spec, t_lhs, t_rhs)

        def run_jax(n):
            for _ in range(n):
                out = product(j_lhs, j_rhs)
            out.block_until_ready()

        def run_torch(n):
            for _ in range(n):
                torch.einsum(spec, t_lhs, t_rhs)

        work = flops(lhs_shape, rhs_shape, spec)
        reps = max(3, int(args.seconds / max(timed(run_jax, 2), 1e-6)))
        rates = {"jax": [], "torch": []}
        for _ in range(args.rounds):
            rates["jax"].append(work / timed(run_jax, reps) / 1e9)
            rates["torch"].append(work / timed(run_torch, reps) / 1e9)
        j, t = statistics.median(rates["jax"]), statistics.median(rates["torch"])
        ratios.append(j / t)
        print(f"{name:34s} {j:12.1f} {t:14.1f} {j / t:10.2f}")
    print(f"median jax/torch over the products: {statistics.median(ratios):.2f}; {args.rounds} rounds, "
          f"medians; cores {cores}; jax {jax.__version__}, torch {torch.__version__}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("command: " + " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv]))


if __name__ == "__main__":
    main()
