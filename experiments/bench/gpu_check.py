"""GPU/accelerator check: the MOX train step, extrapolation and greedy generation at a
TinyLlama-like scale, jitted on whatever accelerator JAX sees.

Reports (JSON on stdout and in --out):
- bf16-compute vs fp32 logits on the same parameters;
- MOX memorisation step time, tokens/s and model-FLOPs utilisation (6*N per trained token for
  forget + retain, 2*N per token for the frozen reference's retain forward; attention FLOPs left out);
- that the forget NLL falls over repeated steps on one batch;
- whether two runs of the same steps from the same state give bitwise-equal parameters;
- extrapolation (donated tree_map) time and effective memory bandwidth;
- greedy KV-cache generation tokens/s.

Reproduce:  python experiments/bench/gpu_check.py --out gpu_check.json
CPU smoke:  python experiments/bench/gpu_check.py --tiny
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn.evals.generate import make_generate_fn
from jaxunlearn.extrapolate import extrapolate
from jaxunlearn.models import (
    ModelConfig,
    init_cache,
    init_model,
    make_apply,
    make_decode,
    param_count,
    param_logical_axes,
    split_params,
)
from jaxunlearn.objectives.registry import get_objective
from jaxunlearn.optim import make_optimizer
from jaxunlearn.sharding import batch_sharding, make_mesh, param_shardings, shard_params
from jaxunlearn.train import copy_tree, init_opt_state, make_train_step

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def model_config(tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig.preset("tiny-llama", vocab_size=256)
    # TinyLlama-1.1B's shape with 16 instead of 22 layers (about 0.9B parameters).
    return ModelConfig.preset("small-llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                              num_layers=16, num_heads=32, num_kv_heads=4, head_dim=64)


def qa_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict:
    """Random tokens, right-padded rows of varying length; the last half of each row is the scored answer."""
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    ids = rng.integers(4, vocab, size=(batch, seq)).astype(np.int32)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    labels = np.where((np.arange(seq)[None, :] >= lengths[:, None] // 2) & (mask > 0), ids, -100).astype(np.int32)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def timed(fn, *args, repeat: int = 1):
    """(result, seconds per call) with a device sync."""
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn(*args)
    jax.block_until_ready(out)
    return out, (time.perf_counter() - t0) / repeat


def peak_tflops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=8, help="forget and retain batch size each")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    report: dict = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                    "jax": jax.__version__}
    cfg = model_config(args.tiny)
    rng = np.random.default_rng(0)

    # bf16 compute vs fp32 on the same fp32 parameters
    model32 = init_model(cfg, seed=0, dtype="float32")
    graphdef32, params = split_params(model32)
    n_params = param_count(params)
    report["params"] = n_params
    # the bf16-compute graph applied to the same fp32 parameters (built abstractly: no second copy)
    graphdef16, _ = split_params(nnx.eval_shape(lambda: init_model(cfg, seed=0, dtype="bfloat16")))
    probe = qa_batch(rng, 4, 64, cfg.vocab_size)
    with jax.default_matmul_precision("highest"):
        l32 = jax.jit(make_apply(graphdef32))(params, probe["input_ids"], probe["attention_mask"])
    l16 = jax.jit(make_apply(graphdef16))(params, probe["input_ids"], probe["attention_mask"])
    real = probe["attention_mask"][..., None] > 0
    diff = np.abs(np.asarray(l32) - np.asarray(l16))[np.broadcast_to(real, l32.shape)]
    p32, p16 = jax.nn.softmax(l32), jax.nn.softmax(l16)
    report["bf16_vs_fp32"] = {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                              "logit_std": float(np.asarray(l32).std()),
                              "max_prob_diff": float(jnp.abs(p32 - p16).max()),
                              "argmax_agreement": float(np.mean((np.asarray(l32).argmax(-1) == np.asarray(l16).argmax(-1))[probe["attention_mask"] > 0]))}

    # MOX memorisation step, bf16 compute, fp32 params and optimiser state
    mesh = make_mesh()
    axes = param_logical_axes(model32)
    shardings = param_shardings(axes, mesh, params)
    params = shard_params(params, axes, mesh)
    ref = copy_tree(params)
    del model32
    apply16 = make_apply(graphdef16)
    optimizer, schedule = make_optimizer(1e-4, total_steps=100, warmup_steps=0)
    opt_state, opt_shardings = init_opt_state(optimizer, params, shardings, mesh)
    step = make_train_step(get_objective("mox"), apply16, optimizer, mesh, shardings, opt_shardings, schedule=schedule)
    batch = {"forget": qa_batch(rng, args.batch, args.seq, cfg.vocab_size),
             "retain": qa_batch(rng, args.batch, args.seq, cfg.vocab_size)}
    batch = jax.device_put(batch, batch_sharding(mesh))

    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, batch, ref)
    jax.block_until_ready(params)
    report["step_compile_and_first_s"] = time.perf_counter() - t0
    start = (copy_tree(params), copy_tree(opt_state))
    nll = [float(m["forget_nll"])]
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, m = step(params, opt_state, batch, ref)
        nll.append(float(m["forget_nll"]))  # one host sync per step, as the training loop does
    step_s = (time.perf_counter() - t0) / args.steps
    tokens = 2 * args.batch * args.seq
    flops = 6 * n_params * tokens + 2 * n_params * args.batch * args.seq
    peak = peak_tflops()
    report["mox_step"] = {"batch_forget": args.batch, "batch_retain": args.batch, "seq": args.seq,
                          "step_s": step_s, "tokens_per_s": tokens / step_s,
                          "model_tflops_per_s": flops / step_s / 1e12,
                          "mfu": None if peak is None else flops / step_s / 1e12 / peak,
                          "forget_nll_first_last": [nll[0], nll[-1]], "finite": bool(m["finite"])}

    # determinism: replay 3 steps from the saved start twice
    def replay(p, o):
        p, o = copy_tree(p), copy_tree(o)
        for _ in range(3):
            p, o, _ = step(p, o, batch, ref)
        return p

    a, b = replay(*start), replay(*start)
    report["bitwise_repeatable"] = bool(all(np.array_equal(np.asarray(x), np.asarray(y))
                                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    del a, b, start

    # extrapolation with donation of the memorised params
    mem = copy_tree(params)
    jax.block_until_ready(extrapolate(ref, copy_tree(params), 4.0))  # compile
    forget, ext_s = timed(lambda: extrapolate(ref, mem, 4.0))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(ref))
    report["extrapolate"] = {"seconds": ext_s, "GB_per_s_read2_write1": 3 * nbytes / ext_s / 1e9,
                             "mem_deleted_after_donation": bool(jax.tree.leaves(mem)[0].is_deleted())}

    # greedy generation with the KV cache (bf16 compute)
    n_new, gen_batch = 64, 16
    gen = make_generate_fn(make_decode(graphdef16), partial(init_cache, cfg, dtype=jnp.bfloat16),
                           max_new_tokens=n_new, eos_id=None, pad_id=0)
    prompts = qa_batch(rng, gen_batch, 64, cfg.vocab_size)
    left_ids = np.zeros_like(prompts["input_ids"])
    left_mask = np.zeros_like(prompts["attention_mask"])
    for i, (ids, msk) in enumerate(zip(prompts["input_ids"], prompts["attention_mask"])):
        n = int(msk.sum())
        left_ids[i, -n:], left_mask[i, -n:] = ids[:n], 1
    timed(gen, forget, left_ids, left_mask)  # compile
    _, gen_s = timed(gen, forget, left_ids, left_mask, repeat=3)
    report["generate"] = {"batch": gen_batch, "new_tokens": n_new, "seconds": gen_s,
                          "tokens_per_s": gen_batch * n_new / gen_s}

    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
