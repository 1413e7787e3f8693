"""Time one MOX train step on the tiny CPU configuration (tiny-llama, the demo's unlearning batch).

    python experiments/bench/tiny_step_time.py [--steps 30] [--repeats 3]

Builds the step from the public API (`make_train_step`, `get_objective("mox")`, AdamW), compiles it,
then times `--steps` steps `--repeats` times and prints the median milliseconds per step (and the
compile time). To compare two versions of the package, run it alternately with PYTHONPATH pointing
at each checkout; report `uptime` with the figures (the machine may be shared).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.models import ModelConfig, init_model, make_apply, param_logical_axes, split_params
from jaxunlearn.objectives import get_objective
from jaxunlearn.optim import make_optimizer
from jaxunlearn.sharding import make_mesh, param_shardings
from jaxunlearn.train import make_train_step

VOCAB, BATCH, LENGTH = 1024, 8, 64  # the demo: synthetic tokenizer, unlearn batch_size 8, max_len 64


def batch(rng: np.random.Generator) -> dict:
    def part():
        ids = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
        lengths = rng.integers(LENGTH // 2, LENGTH + 1, BATCH)
        mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
        labels = np.where((np.arange(LENGTH)[None] >= 8) & (mask == 1), ids, -100).astype(np.int32)
        return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}

    return {"forget": part(), "retain": part()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = ModelConfig.preset("tiny-llama", vocab_size=VOCAB)
    graphdef, params = split_params(init_model(cfg, seed=0))
    mesh = make_mesh(1, 1, 1)
    shardings = param_shardings(param_logical_axes(params), mesh, params)
    params = jax.device_put(params, shardings)
    ref = jax.tree.map(jnp.copy, params)
    optimizer, _ = make_optimizer(1e-3, 1000, 10)
    step = make_train_step(get_objective("mox"), make_apply(graphdef), optimizer, mesh, shardings, params=params)
    opt_state = jax.device_put(optimizer.init(params))
    data = batch(np.random.default_rng(0))
    start = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, data, ref)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for _ in range(3):  # warm-up (the second call may compile again for the outputs' placement)
        params, opt_state, metrics = step(params, opt_state, data, ref)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            params, opt_state, metrics = step(params, opt_state, data, ref)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / args.steps * 1e3)
    print(f"ms/step median {statistics.median(times):.2f} (runs {', '.join(f'{t:.2f}' for t in times)}); "
          f"first call incl. compile {compile_s:.1f} s; loss {float(metrics['loss']):.4f}")


if __name__ == "__main__":
    main()
