"""One MOX memorisation step, jaxunlearn against the same step in PyTorch + transformers, on one CPU.

    python experiments/bench/mox_step.py                  # fp32, 3 alternations of 4 steps each
    python experiments/bench/mox_step.py --dtype bf16     # bfloat16 compute, float32 parameters
    python experiments/bench/mox_step.py --rounds 5 --steps 6
    python experiments/bench/mox_step.py --threads 1      # single-threaded: CPU time per step is fair under load

The step (issue 12): a Llama of 4 layers x 256 hidden, 4 heads, intermediate 688, vocab 8192; a forget
batch of 8 x 128 and a retain batch of 8 x 128 tokens (right-padded, random lengths); the MOX loss
(NLL of the forget answers, per-sample mean, + KL(p_ref || p_theta) on retain positions whose next token is
real, the reference frozen); AdamW lr 1e-5, weight decay 0.01 on matrices only.

- jaxunlearn: the public API, as `jaxunlearn unlearn` builds it: `make_train_step(get_objective("mox"),
  with_loss_chunk(make_apply(graphdef, mesh), TrainSpec.loss_chunk), make_optimizer(...))` on a
  one-device mesh, the library's default model settings (remat, attention; `scan_layers` "auto", which
  runs this step's 4 layers unrolled on one CPU device).
- torch: `LlamaForCausalLM` with the same config and the same weights (`hf_state_dict`), the same loss
  written with torch ops, `torch.optim.AdamW` with the same hyper-parameters and decay mask.
  bf16: `torch.autocast("cpu", torch.bfloat16)` around both forwards (float32 master weights), which is
  what jaxunlearn's bfloat16 compute dtype with float32 parameters does.

Both run in this one process, alternating: each round times `--steps` steps of one then the other (after
warm-up/compilation), `--rounds` rounds. Both use every core the process may use (torch.set_num_threads, XLA's default
intra-op pool). Printed: the first-step loss of both (and their difference: same weights and batch, so it
must be tiny in fp32), tokens/s per round (forget + retain tokens, padding included, as both compute
them), the median ratio jaxunlearn/torch (also by CPU time per step), the load average and the command line.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import numpy as np

VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE = 8192, 256, 4, 4, 688
BATCH, LENGTH = 8, 128
LR, WEIGHT_DECAY = 1e-5, 0.01


def make_batch(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict:
    """{"forget", "retain"}: right-padded rows of random length in [length/2, length], the first quarter
    of each row a prompt (labels -100), the rest scored answer tokens."""

    def part():
        ids = rng.integers(3, vocab, (batch, length)).astype(np.int32)
        lengths = rng.integers(length // 2, length + 1, batch)
        lengths[0] = length  # one full row: the padded length is really used
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        ids = np.where(mask == 1, ids, 0).astype(np.int32)
        labels = np.where((np.arange(length)[None] >= length // 4) & (mask == 1), ids, -100).astype(np.int32)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return {"forget": part(), "retain": part()}


# ----------------------------------------------------------------------------- jaxunlearn
def build_jax(cfg, model, data: dict, dtype: str):
    """(step(params, opt_state) -> (params, opt_state, loss), params, opt_state)."""
    import jax
    import jax.numpy as jnp

    from jaxunlearn.config import TrainSpec
    from jaxunlearn.models import make_apply, param_logical_axes, split_params
    from jaxunlearn.objectives import get_objective
    from jaxunlearn.objectives.common import with_loss_chunk
    from jaxunlearn.optim import make_optimizer
    from jaxunlearn.sharding import make_mesh, param_shardings
    from jaxunlearn.train import make_train_step

    graphdef, params = split_params(model)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shardings = param_shardings(param_logical_axes(params), mesh, params)
    params = jax.device_put(params, shardings)
    ref = jax.tree.map(jnp.copy, params)
    optimizer, schedule = make_optimizer(LR, total_steps=10**9, warmup_steps=0, weight_decay=WEIGHT_DECAY)
    apply = with_loss_chunk(make_apply(graphdef, mesh), TrainSpec().loss_chunk)
    step = make_train_step(get_objective("mox"), apply, optimizer, mesh, shardings, params=params,
                           schedule=schedule)
    opt_state = jax.device_put(optimizer.init(params))
    batch = jax.tree.map(jnp.asarray, data)

    def run(params, opt_state):
        params, opt_state, metrics = step(params, opt_state, batch, ref)
        return params, opt_state, metrics["loss"]

    return run, params, opt_state


# ----------------------------------------------------------------------------- torch + transformers
def build_torch(cfg, weights: dict, data: dict, dtype: str):
    """step() -> loss tensor, for LlamaForCausalLM with the same weights (HF-named numpy arrays)."""
    import torch
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}

    def load():
        m = transformers.LlamaForCausalLM(hf_cfg)
        missing, unexpected = m.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise SystemExit(f"weights do not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
        return m.float()

    policy, reference = load().train(), load().eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    decay = [p for p in policy.parameters() if p.ndim >= 2]
    no_decay = [p for p in policy.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.999), eps=1e-8)
    t = {split: {k: torch.from_numpy(v.astype(np.int64)) for k, v in part.items()} for split, part in data.items()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def loss_fn():
        forget, retain = t["forget"], t["retain"]
        with autocast:
            f_logits = policy(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
            r_logits = policy(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
            with torch.no_grad():
                ref_logits = reference(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
        # forget NLL: mean over samples of the per-sample mean NLL of the scored next tokens
        targets = forget["labels"][:, 1:]
        scored = (targets != -100).float()
        logp = torch.log_softmax(f_logits[:, :-1].float(), -1)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * scored
        count = scored.sum(-1)
        per_sample = -picked.sum(-1) / count.clamp(min=1)
        has = (count > 0).float()
        nll = (per_sample * has).sum() / has.sum().clamp(min=1)
        # retain KL(p_ref || p_theta) at positions whose next token is real
        real = (retain["attention_mask"][:, 1:] > 0).float()
        logp_r = torch.log_softmax(r_logits[:, :-1].float(), -1)
        logq = torch.log_softmax(ref_logits[:, :-1].float(), -1)
        kl = (logq.exp() * (logq - logp_r)).sum(-1)
        kl = (kl * real).sum() / real.sum().clamp(min=1)
        return nll + kl

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


# ----------------------------------------------------------------------------- timing
def timed(fn, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(steps)."""
    start, cpu = time.perf_counter(), time.process_time()
    fn(steps)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rounds", type=int, default=3, help="alternations (each times both sides)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side per round")
    parser.add_argument("--threads", type=int, default=0,
                        help="cores for both (default: every core): the process is pinned to the first N cores, "
                             "which sizes XLA's and torch's thread pools; 1 = single-threaded, whose CPU time per "
                             "step is a fair measure even on a busy machine")
    parser.add_argument("--only", choices=("both", "jax", "torch"), default="both",
                        help="time one side only (profiling); the ratio needs both")
    args = parser.parse_args()
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        print("note: XLA_FLAGS forces several host devices; the benchmark uses one", file=sys.stderr)

    if args.threads:  # before JAX starts its CPU backend, which sizes its thread pool to the usable cores
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    import jax
    import torch

    from jaxunlearn.models import ModelConfig, init_model
    from jaxunlearn.models.hf import hf_state_dict

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.dtype == "bf16" and not ("avx512_bf16" in open("/proc/cpuinfo").read() or
                                     "amx_bf16" in open("/proc/cpuinfo").read()):
        print("note: this CPU has no native bfloat16 (avx512_bf16 / amx_bf16); bf16 will be emulated",
              file=sys.stderr)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_layers=LAYERS,
                      num_heads=HEADS, num_kv_heads=HEADS, head_dim=HIDDEN // HEADS, norm_eps=1e-5)
    model = init_model(cfg, seed=0, dtype="bfloat16" if args.dtype == "bf16" else "float32")
    data = make_batch(np.random.default_rng(0), BATCH, LENGTH, VOCAB)
    tokens = sum(part["input_ids"].size for part in data.values())
    weights = hf_state_dict(model)  # before the jax step donates the model's buffers

    sides = {}
    if args.only in ("both", "jax"):
        run, params, opt_state = build_jax(cfg, model, data, args.dtype)
        state = {"p": params, "o": opt_state}
        start = time.perf_counter()
        state["p"], state["o"], loss = run(state["p"], state["o"])
        jax_loss = float(loss)
        print(f"jaxunlearn first step (incl. compile) {time.perf_counter() - start:.1f} s, loss {jax_loss:.6f}")

        def jax_steps(n):
            for _ in range(n):
                state["p"], state["o"], loss = run(state["p"], state["o"])
            jax.block_until_ready(loss)

        state["p"], state["o"], loss = run(state["p"], state["o"])  # warm-up; after one AdamW update
        jax_loss2 = float(loss)
        sides["jaxunlearn"] = jax_steps
    if args.only in ("both", "torch"):
        torch_step = build_torch(cfg, weights, data, args.dtype)
        start = time.perf_counter()
        torch_loss = float(torch_step())
        print(f"torch first step {time.perf_counter() - start:.1f} s, loss {torch_loss:.6f}")

        def torch_steps(n):
            for _ in range(n):
                torch_step()

        torch_loss2 = float(torch_step())  # warm-up; after one AdamW update
        sides["torch"] = torch_steps
    if len(sides) == 2:  # step 1: policy == reference, so KL = 0; step 2 checks the KL and the update too
        print(f"loss difference |jax - torch|: step 1 {abs(jax_loss - torch_loss):.3e}, "
              f"step 2 {abs(jax_loss2 - torch_loss2):.3e} (losses {jax_loss2:.7f}, {torch_loss2:.7f})")

    rates = {name: [] for name in sides}
    cpu_ms = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, fn in sides.items():
            wall, cpu = timed(fn, args.steps)
            rates[name].append(tokens * args.steps / wall)
            cpu_ms[name].append(cpu / args.steps * 1e3)
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.0f} tokens/s ({cpu_ms[n][-1]:.0f} CPU ms/step)"
                                             for n, v in rates.items()), flush=True)
    for name, v in rates.items():
        print(f"{name}: median {statistics.median(v):.0f} tokens/s (rounds {', '.join(f'{x:.0f}' for x in v)}); "
              f"CPU time median {statistics.median(cpu_ms[name]):.0f} ms/step")
    if len(sides) == 2:
        ratios = [a / b for a, b in zip(rates["jaxunlearn"], rates["torch"])]
        cpu_ratios = [b / a for a, b in zip(cpu_ms["jaxunlearn"], cpu_ms["torch"])]
        print(f"ratio jaxunlearn/torch (throughput): median {statistics.median(ratios):.2f} "
              f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}); by CPU time per step: median "
              f"{statistics.median(cpu_ratios):.2f}")
    print(f"dtype {args.dtype}; {tokens} tokens/step; jax {jax.__version__}, torch {torch.__version__}, "
          f"threads torch {torch.get_num_threads()}, cores used {len(os.sched_getaffinity(0))} of {os.cpu_count()}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable.rsplit('/', 1)[-1], *sys.argv]))


if __name__ == "__main__":
    main()
