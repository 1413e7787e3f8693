"""Accelerator check: the MOX train step's tokens/s and MFU at the Llama-3.2-1B and Llama-3.1-8B
shapes (FSDP over every device present), plus numerical checks at the first shape.

Built from the public API only: `make_train_step` with `get_objective("mox")` and an
`optim.make_optimizer` AdamW (fp32 parameters and optimiser state, bf16 compute, remat on).
Parameters are random (speed does not depend on their values).

Reports (JSON on stdout and in --out):
- per shape, the MOX step: compile time, XLA's per-device memory estimate, step time, tokens/s,
  model TFLOP/s and MFU; a shape whose estimate exceeds the device memory is reported as not
  fitting instead of run (also when the allocation itself fails);
- at the first shape: bf16-compute vs fp32 logits; that the forget NLL falls over repeated steps on
  one batch; whether two replays of 3 steps give bitwise-equal parameters; extrapolation time and
  bandwidth; greedy KV-cache generation tokens/s.

MFU (model FLOPs utilisation; rematerialisation recompute is not counted, so this is not HFU):
  per step   FLOPs = 3 * F(B_forget + B_retain)   trained model, forward + backward (= 2 x forward)
                   + 1 * F(B_retain)              frozen reference, forward only (retain KL)
  forward    F(B) = B * S * (2 * N_matmul + 2 * L * S * H * D)
    N_matmul  parameters that multiply activations: all of them, less the input embedding table
              when it is not tied to the LM head (a lookup is a gather, not a matmul)
    2*L*S*H*D attention scores and weighted values per token under a causal mask: Q K^T and
              A V are 2*S*H*D FLOPs each for the full S x S matrix, half of it below the diagonal
              (L layers, H query heads of size D, S tokens per row; every row is full length)
  MFU = FLOPs / step time / (peak dense bf16 FLOP/s of one device * number of devices),
  peak from PEAK_BF16_TFLOPS by device kind (null when the kind is not in the table).

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
from jaxunlearn.objectives import get_objective
from jaxunlearn.optim import make_optimizer
from jaxunlearn.sharding import batch_sharding, check_batch_divisible, make_mesh, param_shardings
from jaxunlearn.train import copy_tree, make_train_step, opt_state_shardings

# Dense (no sparsity) bf16 peak TFLOP/s per device; the first name contained in jax's device_kind wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("B200", 2250.0), ("A100", 312.0),
    ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
    ("TPU v6 lite", 918.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("TPU v4", 275.0),
]

# the measured shapes: jaxunlearn's presets of the public checkpoints' config.json (models/config.py HF_SHAPES)
SHAPES = {"llama-3.2-1b": "Llama-3.2-1B", "llama-3.1-8b": "Llama-3.1-8B"}
GiB = 2**30


def model_config(shape: str, attention: str = "xla", remat: str | None = None) -> ModelConfig:
    """The shape's config; remat defaults to "full" for the real shapes and "none" for tiny."""
    if shape == "tiny":
        return ModelConfig.preset("tiny-llama", vocab_size=256).replace(attention=attention, remat=remat or "none")
    return ModelConfig.preset(SHAPES[shape]).replace(remat=remat or "full", attention=attention)


def matmul_params(cfg: ModelConfig, n_params: int) -> int:
    """Parameters that multiply activations (see the module docstring)."""
    return n_params if cfg.tie_word_embeddings else n_params - cfg.vocab_size * cfg.hidden_size


def step_flops(cfg: ModelConfig, n_params: int, batch_forget: int, batch_retain: int, seq: int) -> float:
    """Model FLOPs of one MOX step (formula in the module docstring)."""
    per_token = 2 * matmul_params(cfg, n_params) + 2 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim

    def forward(rows):
        return rows * seq * per_token

    return 3 * forward(batch_forget + batch_retain) + forward(batch_retain)


def peak_tflops(kind: str) -> float | None:
    return next((v for name, v in PEAK_BF16_TFLOPS if name in kind), None)


def qa_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int, full: bool = False) -> dict:
    """Random tokens; rows right-padded to varying lengths (every row full length if `full`);
    the last half of each row is the scored answer."""
    lengths = np.full(batch, seq) if full else rng.integers(seq // 2, seq + 1, size=batch)
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


def graphdef_and_abstract(cfg: ModelConfig, dtype: str):
    """(graphdef for compute dtype `dtype`, fp32 parameters as ShapeDtypeStructs); nothing allocated."""
    return split_params(nnx.eval_shape(lambda: init_model(cfg, seed=0, dtype=dtype)))


def random_params(abstract, shardings, seed: int = 0, dtype=None):
    """Random parameters created in place, shard by shard: normal(0, 0.02), norm scales 1."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out = []
    for i, ((path, leaf), sharding) in enumerate(zip(leaves, jax.tree.leaves(shardings))):
        kind = dtype or leaf.dtype
        if "norm" in jax.tree_util.keystr(path):
            make = partial(jnp.ones, leaf.shape, kind)
        else:
            make = partial(lambda k, s, t: (0.02 * jax.random.normal(k, s)).astype(t),
                           jax.random.fold_in(jax.random.key(seed), i), leaf.shape, kind)
        out.append(jax.jit(make, out_shardings=sharding)())
    return jax.tree_util.tree_unflatten(treedef, out)


def memory_estimate(compiled) -> dict | None:
    """XLA's per-device memory analysis of a compiled step, in GiB (None where unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    args, temps, outs = m.argument_size_in_bytes, m.temp_size_in_bytes, m.output_size_in_bytes
    peak = args + temps + outs - m.alias_size_in_bytes
    return {"arguments_gib": args / GiB, "temporaries_gib": temps / GiB, "outputs_gib": outs / GiB,
            "peak_gib": peak / GiB}


def device_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["bytes_limit"] / GiB if "bytes_limit" in stats else None


def mox_step(cfg: ModelConfig, args, rng: np.random.Generator, keep: bool = False) -> tuple[dict, dict | None]:
    """Compile the MOX step for `cfg` against abstract arguments, then (if it fits) run and time it.
    Returns (report, state for the follow-up checks when `keep`)."""
    mesh = make_mesh(data=1, fsdp=jax.device_count())
    check_batch_divisible(args.batch, mesh, "--batch")
    graphdef16, abstract = graphdef_and_abstract(cfg, "bfloat16")
    shardings = param_shardings(param_logical_axes(abstract), mesh, abstract)
    n_params = param_count(abstract)
    optimizer, schedule = make_optimizer(1e-5, total_steps=1000, warmup_steps=0)
    opt_shardings = opt_state_shardings(optimizer, abstract, shardings, mesh)
    step = make_train_step(get_objective("mox"), make_apply(graphdef16), optimizer, mesh, shardings, opt_shardings,
                           schedule=schedule)
    seq = args.seq
    batch = {part: qa_batch(rng, args.batch, seq, cfg.vocab_size, full=True) for part in ("forget", "retain")}

    def spec(tree, sh):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

    p_spec = spec(abstract, shardings)
    ref_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, args.reference_dtype, sharding=x.sharding), p_spec)
    o_spec = spec(jax.eval_shape(optimizer.init, abstract), opt_shardings)
    b_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh)), batch)
    t0 = time.perf_counter()
    compiled = step.lower(p_spec, o_spec, b_spec, ref_spec).compile()
    report = {"params": n_params, "matmul_params": matmul_params(cfg, n_params), "devices": jax.device_count(),
              "mesh": dict(mesh.shape), "batch_forget": args.batch, "batch_retain": args.batch, "seq": seq,
              "reference_dtype": args.reference_dtype, "remat": cfg.remat,
              "compile_s": time.perf_counter() - t0, "memory_per_device": memory_estimate(compiled)}
    limit = device_memory_gib()
    report["device_memory_gib"] = limit
    need = (report["memory_per_device"] or {}).get("peak_gib")
    if limit is not None and need is not None and need > limit:
        report["fits"] = False
        return report, None
    try:
        params = random_params(abstract, shardings)
        ref = random_params(abstract, shardings, dtype=args.reference_dtype) if args.reference_dtype != "float32" \
            else copy_tree(params)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
        batch = jax.device_put(batch, batch_sharding(mesh))
        params, opt_state, m = compiled(params, opt_state, batch, ref)
        jax.block_until_ready(params)
    except Exception as e:  # XLA reports an out-of-memory allocation as RESOURCE_EXHAUSTED
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report["fits"] = False
        report["error"] = str(e).splitlines()[0][:300]
        return report, None
    report["fits"] = True
    start = (copy_tree(params), copy_tree(opt_state)) if keep else None
    nll = [float(m["forget_nll"])]
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, m = compiled(params, opt_state, batch, ref)
        nll.append(float(m["forget_nll"]))  # one host sync per step, as the training loop does
    step_s = (time.perf_counter() - t0) / args.steps
    flops = step_flops(cfg, n_params, args.batch, args.batch, seq)
    kind = jax.devices()[0].device_kind
    peak = peak_tflops(kind)
    report.update(step_s=step_s, tokens_per_s=2 * args.batch * seq / step_s, model_tflop_per_step=flops / 1e12,
                  model_tflops_per_s=flops / step_s / 1e12,
                  peak_tflops_per_device=peak,
                  mfu=None if peak is None else flops / step_s / 1e12 / (peak * jax.device_count()),
                  forget_nll_first_last=[nll[0], nll[-1]], finite=bool(m["finite"]))
    if not keep:
        return report, None
    return report, {"step": compiled, "params": params, "ref": ref, "batch": batch, "start": start,
                    "graphdef16": graphdef16, "abstract": abstract}


def bf16_vs_fp32(cfg: ModelConfig, params, graphdef16, rng: np.random.Generator) -> dict:
    """Logits of bf16 compute (cfg's attention) vs fp32 compute (XLA attention) on the same fp32 parameters."""
    graphdef32, _ = graphdef_and_abstract(cfg.replace(attention="xla"), "float32")  # cuDNN attention is bf16/fp16
    probe = qa_batch(rng, 4, 64, cfg.vocab_size)
    with jax.default_matmul_precision("highest"):
        l32 = jax.jit(make_apply(graphdef32))(params, probe["input_ids"], probe["attention_mask"])
    l16 = jax.jit(make_apply(graphdef16))(params, probe["input_ids"], probe["attention_mask"])
    l32, l16 = np.asarray(l32, np.float32), np.asarray(l16, np.float32)
    real = probe["attention_mask"] > 0
    diff = np.abs(l32 - l16)[real]
    p32, p16 = jax.nn.softmax(l32), jax.nn.softmax(l16)
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "logit_std": float(l32.std()), "max_prob_diff": float(jnp.abs(p32 - p16).max()),
            "argmax_agreement": float(np.mean((l32.argmax(-1) == l16.argmax(-1))[real]))}


def follow_up_checks(cfg: ModelConfig, st: dict, rng: np.random.Generator) -> dict:
    """Determinism, extrapolation and generation on the state left by `mox_step(keep=True)`."""
    step, ref, batch = st["step"], st["ref"], st["batch"]
    out = {"bf16_vs_fp32": bf16_vs_fp32(cfg, st["params"], st["graphdef16"], rng)}

    def replay(p, o):
        p, o = copy_tree(p), copy_tree(o)
        for _ in range(3):
            p, o, _ = step(p, o, batch, ref)
        return p

    a, b = replay(*st["start"]), replay(*st["start"])
    out["bitwise_repeatable"] = bool(all(np.array_equal(np.asarray(x), np.asarray(y))
                                         for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    del a, b, st["start"]

    # extrapolation with donation of the memorised params
    params = st.pop("params")
    ref32 = jax.tree.map(lambda r, p: r.astype(p.dtype), ref, params)
    jax.block_until_ready(extrapolate(ref32, copy_tree(params), 4.0))  # compile
    forget, ext_s = timed(lambda: extrapolate(ref32, params, 4.0))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(ref32))
    out["extrapolate"] = {"seconds": ext_s, "GB_per_s_read2_write1": 3 * nbytes / ext_s / 1e9,
                          "mem_deleted_after_donation": bool(jax.tree.leaves(params)[0].is_deleted())}

    # greedy generation with the KV cache (bf16 compute)
    n_new, gen_batch = 64, 16
    gen = make_generate_fn(make_decode(st["graphdef16"]), partial(init_cache, cfg, dtype=jnp.bfloat16),
                           max_new_tokens=n_new, eos_id=None, pad_id=0)
    prompts = qa_batch(rng, gen_batch, 64, cfg.vocab_size)
    left_ids = np.zeros_like(prompts["input_ids"])
    left_mask = np.zeros_like(prompts["attention_mask"])
    for i, (ids, msk) in enumerate(zip(prompts["input_ids"], prompts["attention_mask"])):
        n = int(msk.sum())
        left_ids[i, -n:], left_mask[i, -n:] = ids[:n], 1
    timed(gen, forget, left_ids, left_mask)  # compile
    _, gen_s = timed(gen, forget, left_ids, left_mask, repeat=3)
    out["generate"] = {"batch": gen_batch, "new_tokens": n_new, "seconds": gen_s,
                       "tokens_per_s": gen_batch * n_new / gen_s}
    return out


def set_attention_block(block: int | None) -> None:
    """--attention-block: the block size of the xla attention, or (0) jax.nn.dot_product_attention whole."""
    from jaxunlearn.models import decoder

    if block == 0:
        decoder.causal_attention = lambda q, k, v, allowed, block=None: jax.nn.dot_product_attention(
            q, k, v, mask=allowed, implementation="xla")
    elif block is not None:
        decoder.ATTENTION_BLOCK = block


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model only (CPU smoke test)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES),
                    help="shapes to time (the first also gets the numerical checks)")
    ap.add_argument("--batch", type=int, default=8, help="forget and retain rows each (global, over all devices)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reference-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype the frozen reference is held in")
    ap.add_argument("--attention", choices=("xla", "cudnn"), default="xla",
                    help="jax.nn.dot_product_attention implementation (cudnn: NVIDIA GPUs only)")
    ap.add_argument("--remat", default=None, help="rematerialisation policy (default: full; none for --tiny)")
    ap.add_argument("--attention-block", type=int, default=None,
                    help="queries per block of the xla attention (models.decoder.causal_attention; default the "
                         "library's); 0: one jax.nn.dot_product_attention over all queries (the code before it)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.shapes, args.seq, args.steps = ["tiny"], min(args.seq, 64), min(args.steps, 5)
    set_attention_block(args.attention_block)
    report: dict = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                    "devices": jax.device_count(), "jax": jax.__version__, "attention": args.attention,
                    "attention_block": args.attention_block,
                    "mox_step": {}}
    rng = np.random.default_rng(0)
    for i, shape in enumerate(args.shapes):
        cfg = model_config(shape, args.attention, args.remat)
        step_report, state = mox_step(cfg, args, rng, keep=i == 0)
        report["mox_step"][shape] = step_report
        if state is not None:
            report["checks"] = dict(follow_up_checks(cfg, state, rng), shape=shape)
        del state
        print(json.dumps({shape: step_report}), flush=True)  # partial results survive a later failure

    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
