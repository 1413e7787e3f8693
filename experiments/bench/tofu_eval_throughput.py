"""TOFU evaluation throughput: jaxunlearn's jitted path vs a straightforward transformers (PyTorch) one.

Both compute the same TOFU quantities on the same tiny random Llama model (built in transformers,
saved, and loaded into JAX with jaxunlearn.models.load_hf) and the same rows: per-sample answer
probability, truth ratio (paraphrased vs perturbed answers), normalised probability for
real_authors / world_facts, and ROUGE-L recall of greedy answers. The PyTorch path is what the TOFU
reference code does: right-padded batches through model(...) for the losses, left-padded batches
through model.generate(do_sample=False) for the answers. The metric formulas (jaxunlearn.evals.metrics)
are shared; what is compared is the model computation.

The contenders alternate in one run, --rounds times (default 3); each round runs
  transformers  in this process (the model built once)
  cold          a fresh JAX process on a new, empty persistent compilation cache folder: the evaluation
                including every compilation, then again (compiled, nothing left to compile)
  warm          a second fresh JAX process on that now-filled cache: the evaluation with every program
                loaded from the cache (tracing and lowering still counted), then again (compiled)
  compiled      the faster of the two processes' second evaluations
The metric code both sides share (rouge_score) is loaded, as a new scorer, before each timed evaluation.
Each JAX process reports how many programs it built and how many came from the cache. Prints every
round's times and speed-ups, the median of each time and the median of each per-round speed-up, the
fastest round of each contender and the speed-ups between those,
whether all JAX evaluations gave identical results and whether they agree with transformers
(per-sample NLLs, generations, summaries; exit status 1 if not), the load average and the command.

    python experiments/bench/tofu_eval_throughput.py [--rounds 3] [--rows 40] [--max-new-tokens 200] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "tofu"),
                   help="TOFU JSONL folder (falls back to the synthetic benchmark when missing)")
    p.add_argument("--rows", type=int, default=40, help="rows per split (forget, retain, real_authors, world_facts)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternations: each runs transformers, a JAX process on a new empty cache, one on that cache")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)  # internal: a JAX phase process
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data and model

def load_rows(args):
    from jaxunlearn import data

    if (pathlib.Path(args.data_dir) / "full.jsonl").exists():
        bench = data.tofu_benchmark("forget10", source=args.data_dir)
        source = f"TOFU ({args.data_dir})"
    else:
        bench = data.synthetic_benchmark(seed=0)
        source = "synthetic benchmark (TOFU folder not found)"
    n = args.rows
    splits = {"forget": bench.forget_perturbed[:n], "retain": bench.retain_perturbed[:n]}
    for name in ("real_authors", "world_facts"):
        if bench.extra_evals.get(name):
            splits[name] = bench.extra_evals[name][:n]
    return bench, splits, source


def build_model(args, tokenizer, folder):
    """The random transformers Llama (seed 0), saved to folder for the JAX processes to load."""
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.max_len + args.max_new_tokens + 8,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(folder)
    return hf


# ----------------------------------------------------------------------------- PyTorch reference path

def torch_mean_nll(model, examples, pad_id, batch_size):
    """Per-example mean NLL over scored labels, right-padded batches (as TOFU's get_batch_loss)."""
    import torch

    out = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            labels[i, :len(e["labels"])] = torch.tensor(e["labels"])
            mask[i, :len(e["input_ids"])] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100,
                                                 reduction="none")
        counts = (shift_labels != -100).sum(-1)
        out += (loss.sum(-1) / counts).tolist()
    return out


def torch_generate(model, prompts, pad_id, eos_id, batch_size, max_new_tokens):
    """Greedy answers token ids, left-padded batches through model.generate."""
    import torch

    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=eos_id)
        for row in seq[:, width:].tolist():
            out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def torch_tofu(model, tok, fmt, splits, args):
    """TOFU split summaries computed with the PyTorch model (metric formulas shared)."""
    from jaxunlearn.data import encode_prompt, encode_qa
    from jaxunlearn.evals import metrics as M

    def nll(pairs):
        ex = [encode_qa(tok, fmt, q, a, args.max_len) for q, a in pairs]
        return M.np.array(torch_mean_nll(model, ex, tok.pad_token_id, args.batch_size))

    out = {}
    for name, rows in splits.items():
        gt = nll([(r["question"], r["answer"]) for r in rows])
        k = len(rows[0]["perturbed_answer"])
        pert = nll([(r["question"], p) for r in rows for p in r["perturbed_answer"]]).reshape(len(rows), k)
        if name in ("forget", "retain"):
            true = nll([(r["question"], r["paraphrased_answer"]) for r in rows])
            prob = M.probability(gt)
        else:
            true, prob = gt, M.normalised_probability(gt, pert)
        ratios = M.truth_ratio(true, pert)
        prompts = [encode_prompt(tok, fmt, r["question"]) for r in rows]
        gens = tok.batch_decode(torch_generate(model, prompts, tok.pad_token_id, tok.eos_token_id, args.batch_size,
                                               args.max_new_tokens), skip_special_tokens=True)
        rouge = [M.rouge_l_recall(g, r["answer"]) for g, r in zip(gens, rows)]
        tr = M.forget_truth_score(ratios) if name == "forget" else M.retain_truth_score(ratios)
        out[name] = {"summary": {"prob": float(prob.mean()), "rouge": float(M.np.mean(rouge)), "truth_ratio": tr},
                     "mean_nll": gt.tolist(), "generations": gens}
    return out


# ----------------------------------------------------------------------------- JAX path

def jax_tofu(ev, splits, args):
    from jaxunlearn.evals.tofu import evaluate_splits

    out = {}
    for name, (summary, records) in evaluate_splits(ev, splits, args.max_new_tokens).items():
        out[name] = {"summary": {k: summary[k] for k in ("prob", "rouge", "truth_ratio")},
                     "mean_nll": [r["mean_nll"] for r in records], "generations": [r["generation"] for r in records]}
    return out


class CompileCounter:
    """Counts the programs jax builds (each a compilation or a persistent-cache load) and the cache hits."""

    def __init__(self):
        import jax

        self.programs = self.hits = 0
        self.seconds = {"trace": 0.0, "lower": 0.0, "compile_or_load": 0.0}
        names = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                 "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                 "/jax/core/compile/backend_compile_duration": "compile_or_load"}

        def on_duration(event, secs, **_):
            if event in names:
                self.seconds[names[event]] += secs
                self.programs += event.endswith("backend_compile_duration")

        def on_event(event, **_):
            self.hits += event == "/jax/compilation_cache/cache_hits"

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)

    def snapshot(self):
        return {"programs": self.programs, "cache_hits": self.hits,
                **{f"{k}_s": round(v, 3) for k, v in self.seconds.items()}}


def jax_phase(args) -> int:
    """One JAX process (--phase-out FILE): two evaluations timed, with the persistent cache in --cache-dir."""
    import json

    from jaxunlearn import compile_cache
    from jaxunlearn.data import bucket_ladder, prompt_format_for, synthetic_benchmark, synthetic_tokenizer
    from jaxunlearn.evals.evaluator import Evaluator
    from jaxunlearn.models import load_hf, split_params

    # the cache every jaxunlearn command sets up, in this round's folder, before anything compiles
    os.environ[compile_cache.ENV] = args.cache_dir
    compile_cache.enable()
    _, splits, _ = load_rows(args)
    tok = synthetic_tokenizer(synthetic_benchmark(seed=0))
    model = load_hf(args.model_dir)
    graphdef, params = split_params(model)
    ev = Evaluator.create(graphdef, params, model.config, tok, prompt_format_for(tok, "qa"),
                          batch_size=args.batch_size, buckets=bucket_ladder(args.max_len), max_len=args.max_len)
    counter = CompileCounter()
    runs = []
    for _ in range(2):
        load_shared_metrics()
        t0 = time.perf_counter()
        result = jax_tofu(ev, splits, args)
        runs.append({"seconds": time.perf_counter() - t0, "result": result, **counter.snapshot()})
    pathlib.Path(args.phase_out).write_text(json.dumps(runs))
    return 0


def run_phase(argv, model_dir, cache_dir, name, tmp):
    """Run jax_phase in a fresh process; returns its two runs."""
    import json
    import subprocess

    out = pathlib.Path(tmp) / f"{name}.json"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *argv, "--model-dir", model_dir,
           "--cache-dir", cache_dir, "--phase-out", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def agreement(ours, ref, splits):
    """Print per-split agreement of JAX vs torch results; True when all within tolerance."""
    import numpy as np

    ok = True
    for name in splits:
        a, b = ours[name], ref[name]
        d_nll = float(np.max(np.abs(np.array(a["mean_nll"]) - np.array(b["mean_nll"]))))
        same = float(np.mean([x == y for x, y in zip(a["generations"], b["generations"])]))
        vals = "  ".join(f"{k} {a['summary'][k]:.5f}/{b['summary'][k]:.5f}" for k in ("prob", "truth_ratio", "rouge"))
        close = d_nll < 1e-3 and all(abs(a["summary"][k] - b["summary"][k]) <= 1e-3 * max(1.0, abs(b["summary"][k]))
                                     for k in ("prob", "truth_ratio", "rouge"))
        ok &= close
        print(f"  {name:12s} {vals}  max|dNLL| {d_nll:.2e}  identical generations {same:.0%}  {'OK' if close else 'DIFF'}")
    return ok


def load_shared_metrics():
    """Load the metric code both sides share (rouge_score and its stemmer, imported on first use) before
    each timed evaluation, so that no side's time includes it (it would fall on every JAX process but
    only on the first transformers round), with a new scorer: the stems it remembers from an earlier
    evaluation (the same answers) would favour the later ones."""
    from jaxunlearn.evals import metrics as M

    M._scorer.cache_clear()
    M.rouge_l_recall("warm up", "warm up")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def phase_summary(info) -> str:
    return (f"programs {info['programs']} (cache hits {info['cache_hits']}; trace {info['trace_s']:.2f} s, "
            f"lower {info['lower_s']:.2f} s, compile/load {info['compile_or_load_s']:.2f} s)")


def one_round(argv, args, hf, tok, fmt, splits, model_dir, tmp, r):
    """transformers, then a JAX process on a new empty cache (cold), then one on that filled cache (warm)."""
    load_shared_metrics()
    t0 = time.perf_counter()
    ref = torch_tofu(hf, tok, fmt, splits, args)
    t_torch = time.perf_counter() - t0
    cache_dir = str(pathlib.Path(tmp) / f"jax_cache_{r}")
    cold = run_phase(argv, model_dir, cache_dir, f"cold{r}", tmp)
    warm = run_phase(argv, model_dir, cache_dir, f"warm{r}", tmp)
    times = {"transformers": t_torch, "cold": cold[0]["seconds"], "warm": warm[0]["seconds"],
             "compiled": min(cold[1]["seconds"], warm[1]["seconds"])}
    results = [run["result"] for run in cold + warm]
    print(f"round {r + 1}: " + "  ".join(f"{k} {v:6.2f} s" for k, v in times.items())
          + "  speed-up " + " ".join(f"{k} {t_torch / times[k]:.2f}x" for k in ("cold", "warm", "compiled"))
          + f"  [load {load_average()}]", flush=True)
    print(f"         cold: {phase_summary(cold[0])}; warm: {phase_summary(warm[0])}; programs built by the "
          f"second evaluations: {cold[1]['programs'] - cold[0]['programs']}, {warm[1]['programs'] - warm[0]['programs']}",
          flush=True)
    return times, ref, results


def main(argv=None) -> int:
    import statistics

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.phase_out:
        return jax_phase(args)
    if args.rounds < 1:
        print(f"--rounds must be >= 1, got {args.rounds}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from jaxunlearn.data import prompt_format_for, synthetic_benchmark, synthetic_tokenizer

    load_before = load_average()
    load_shared_metrics()
    bench, splits, source = load_rows(args)
    tok = synthetic_tokenizer(synthetic_benchmark(seed=0))
    fmt = prompt_format_for(tok, "qa")
    n_seq = sum(len(r) * (2 + len(r[0]["perturbed_answer"])) for r in splits.values())
    n_gen = sum(len(r) for r in splits.values())
    rounds, refs, jax_results = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(pathlib.Path(tmp) / "model")
        hf = build_model(args, tok, model_dir)
        print(f"data: {source}; rows per split: " + ", ".join(f"{k}={len(v)}" for k, v in splits.items()))
        print(f"model: random Llama, hidden={args.hidden}, layers={args.layers}, vocab={len(tok)}, "
              f"{sum(p.numel() for p in hf.parameters()) / 1e6:.2f}M params")
        print(f"work: {n_seq} teacher-forced sequences, {n_gen} greedy generations of up to {args.max_new_tokens} tokens")
        print(f"torch threads {torch.get_num_threads()}; {args.rounds} rounds, each: transformers, JAX cold cache, "
              f"JAX warm cache; load average before: {load_before}", flush=True)
        for r in range(args.rounds):
            times, ref, results = one_round(argv, args, hf, tok, fmt, splits, model_dir, tmp, r)
            rounds.append(times)
            refs.append(ref)
            jax_results += results

    med = {k: statistics.median(t[k] for t in rounds) for k in rounds[0]}
    print(f"\nmedian over {len(rounds)} rounds:")
    for k, label in (("transformers", "transformers (PyTorch, eager)"),
                     ("cold", "jaxunlearn, cold cache (incl. compile)"),
                     ("warm", "jaxunlearn, warm cache (incl. cache loads)"),
                     ("compiled", "jaxunlearn, compiled (second evaluation)")):
        ratio = "" if k == "transformers" else (
            f"   median speed-up {statistics.median(t['transformers'] / t[k] for t in rounds):5.2f}x")
        print(f"  {label:44s} {med[k]:8.2f} s{ratio}")
    best = {k: min(t[k] for t in rounds) for k in rounds[0]}
    print("fastest round of each (load only slows a run down): "
          + ", ".join(f"{k} {v:.2f} s" + ("" if k == "transformers" else f" ({best['transformers'] / v:.2f}x)")
                      for k, v in best.items()))
    print("goals: >= 3x warm cache, >= 2x cold cache")

    identical = all(r == jax_results[0] for r in jax_results[1:])
    print(f"\nall {len(jax_results)} JAX evaluations identical: {'yes' if identical else 'NO'}")
    same_ref = all(r == refs[0] for r in refs[1:])
    print(f"all {len(refs)} transformers evaluations identical: {'yes' if same_ref else 'NO'}")
    print("metric agreement (jax vs torch):")
    ok = agreement(jax_results[0], refs[0], splits) and identical
    print(f"all metrics within tolerance (NLL 1e-3, summaries 1e-3 rel): {'yes' if ok else 'NO'}")
    print(f"load average before: {load_before}; after: {load_average()}")
    print(f"\nreproduce: python experiments/bench/tofu_eval_throughput.py {' '.join(argv)}".rstrip())
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
