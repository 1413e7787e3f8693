"""Time of the compiled greedy generation program alone (one `make_generate_fn` call), no transformers.

A random Llama shaped like tofu_eval_throughput.py's model (hidden 128, intermediate 256, 4 layers, 4 heads,
vocabulary 1024), 16 left-padded prompts of 20-64 random tokens (width 64), 200 new tokens, no EOS (every
call runs all 200 decoding steps, 264 cache slots). Prints trace + lower and compile time, then CPU time
(time.process_time, XLA's threads included) and wall time per call over --calls calls, medians, the
load average and the command.

    python experiments/bench/generate_step.py [--calls 5] [--new-tokens 200] [--width 64]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from jaxunlearn.evals.generate import make_generate_fn
from jaxunlearn.models import ModelConfig, init_cache, init_model, make_decode, split_params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    cfg = ModelConfig(arch="llama", model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=256,
                      num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, max_position_embeddings=512)
    graphdef, params = split_params(init_model(cfg, seed=0))
    rng = np.random.default_rng(0)
    ids = np.zeros((args.batch, args.width), np.int32)
    mask = np.zeros_like(ids)
    for b in range(args.batch):
        n = int(rng.integers(min(20, args.width), args.width + 1))
        ids[b, -n:] = rng.integers(3, cfg.vocab_size, n)
        mask[b, -n:] = 1
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    gen = make_generate_fn(make_decode(graphdef), functools.partial(init_cache, cfg), args.new_tokens, None, 0)
    start = time.process_time()
    lowered = gen.lower(params, ids, mask)
    traced = time.process_time() - start
    start = time.process_time()
    compiled = lowered.compile()
    print(f"trace + lower {traced:.2f} s CPU, compile {time.process_time() - start:.2f} s CPU")
    compiled(params, ids, mask).block_until_ready()
    cpu, wall = [], []
    for _ in range(args.calls):
        t, c = time.perf_counter(), time.process_time()
        compiled(params, ids, mask).block_until_ready()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    steps = args.new_tokens
    print(f"per call: CPU {np.median(cpu) * 1e3:.0f} ms ({np.median(cpu) / steps * 1e3:.2f} ms per step), "
          f"wall {np.median(wall) * 1e3:.0f} ms; medians of {args.calls}")
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))


if __name__ == "__main__":
    main()
