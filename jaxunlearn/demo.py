"""`jaxunlearn demo [--out DIR] [--fast]`: MOX end to end on the built-in synthetic benchmark.

1. fine-tune a tiny random-initialised model on the benchmark's `full` split (the reference),
2. MOX: memorise the forget split from the reference, keeping retain outputs close (KL),
3. extrapolate through the reference (alpha 4) to get the forget model,
4. print forget / retain / holdout mean NLL and answer probability P(a|q) before and after.

Runs through the same code as the CLI (`jaxunlearn.runner`): run directories DIR/reference
and DIR/unlearn hold the checkpoints and metrics, and rerunning resumes. The settings are
`DEMO` below (mirrored by experiments/configs/demo_finetune.yaml and demo_unlearn.yaml); `--fast` shortens both stages for
tests. Sized to finish in about a minute on two CPU cores; it prints the time of each phase (also
logged as the `demo_seconds` event in DIR/unlearn/metrics.jsonl). Through the `jaxunlearn` command a
second run loads its compiled programs from the persistent compilation cache (jaxunlearn.compile_cache).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import pathlib
import sys
import time

import jax
import numpy as np

from jaxunlearn import checkpoint as ck
from jaxunlearn.config import from_dict

# Two RunConfigs: the reference fine-tune and the MOX unlearning run.
_DATA = {"benchmark": "synthetic", "synthetic_entities": 20, "max_len": 64, "buckets": [64]}
DEMO = {
    "finetune": {
        "model": {"preset": "tiny-llama", "init_seed": 0},
        "data": _DATA,
        "train": {"lr": 3e-3, "epochs": 30, "batch_size": 16, "weight_decay": 0.0, "warmup_epochs": 1.0, "seed": 0},
        "checkpoint": {"save_every": 100, "keep": 1},
    },
    "unlearn": {
        "data": _DATA,
        "train": {"lr": 1e-3, "epochs": 10, "batch_size": 8, "weight_decay": 0.01, "warmup_epochs": 1.0, "seed": 0},
        "method": {"name": "mox", "objective": "mox", "retain_weight": 1.0, "alpha": 4.0},
        "checkpoint": {"save_every": 100, "keep": 1},
    },
}
FAST = {"finetune": {"train": {"epochs": 2}}, "unlearn": {"train": {"epochs": 1}}}
EVAL_BATCH = 32


def demo_configs(fast: bool = False) -> dict:
    """{'finetune': RunConfig, 'unlearn': RunConfig} of the demo."""
    d = copy.deepcopy(DEMO)
    if fast:
        for stage, sections in FAST.items():
            for section, values in sections.items():
                d[stage][section].update(values)
    return {stage: from_dict(d[stage], where=f"demo.{stage}") for stage in d}


def split_nll(setup, params, tokenizer, cfg, rows: list[dict]) -> np.ndarray:
    """Per-sample mean answer NLL of `rows` under `params` (teacher forcing, jaxunlearn.ops)."""
    from jaxunlearn.data import collate
    from jaxunlearn.rundir import encode

    examples = encode(tokenizer, cfg, rows)
    score = _scorer(setup)
    out = []
    for i in range(0, len(examples), EVAL_BATCH):
        chunk = examples[i : i + EVAL_BATCH]
        padded = chunk + [chunk[0]] * (EVAL_BATCH - len(chunk))  # one static batch shape
        batch = collate(padded, tokenizer.pad_token_id, (max(cfg.data.buckets),))
        out.append(np.asarray(score(params, batch["input_ids"], batch["attention_mask"], batch["labels"]))[: len(chunk)])
    return np.concatenate(out)


_SCORERS: dict = {}


def _scorer(setup):
    from jaxunlearn import ops

    key = id(setup.graphdef)
    if key not in _SCORERS:
        apply = setup.apply
        _SCORERS[key] = jax.jit(lambda p, ids, mask, labels: ops.mean_sequence_nll(apply(p, ids, mask), labels))
    return _SCORERS[key]


def load_models(out: pathlib.Path, cfg) -> tuple[object, dict]:
    """(model setup, {name: params}) of the reference and the forget model of the demo's unlearning run."""
    from jaxunlearn.rundir import load_run_params

    run = out / "unlearn"
    setup, ref, _ = load_run_params(run, "reference")
    _, forget, _ = load_run_params(run, "forget", alpha=cfg.method.params.alpha, mesh=setup.mesh)
    return setup, {"reference": ref, f"forget (alpha={cfg.method.params.alpha:g})": forget}


def before_after(setup, models: dict, cfg, bench, tokenizer) -> dict[str, dict[str, tuple[float, float]]]:
    """{model: {split: (mean NLL, mean P(a|q))}} for each of `models` (name -> params)."""
    splits = {"forget": bench.forget, "retain": bench.retain_perturbed, "holdout": bench.holdout}
    table = {}
    for name, params in models.items():
        table[name] = {}
        for split, rows in splits.items():
            nll = split_nll(setup, params, tokenizer, cfg, rows)
            table[name][split] = (float(nll.mean()), float(np.exp(-nll).mean()))
    return table


def tofu_style(setup, models: dict, cfg, bench, tokenizer, max_new_tokens: int = 24) -> dict[str, dict[str, float]]:
    """TOFU metrics (jaxunlearn.evals) of each of `models` (name -> params) on the synthetic benchmark:
    forget / retain answer probability, truth-ratio score and ROUGE-L recall of greedy answers
    (up to `max_new_tokens`), and model utility."""
    from jaxunlearn.data import prompt_format_for
    from jaxunlearn.evals.evaluator import Evaluator
    from jaxunlearn.evals.tofu import evaluate_tofu

    fmt = prompt_format_for(tokenizer, cfg.data.prompt_format)
    first = next(iter(models.values()))
    ev = Evaluator.create(setup.graphdef, first, setup.model_cfg, tokenizer, fmt, mesh=setup.mesh, batch_size=EVAL_BATCH,
                          buckets=(max(cfg.data.buckets),), max_len=max(cfg.data.buckets))
    table = {}
    for name, params in models.items():
        summary, _ = evaluate_tofu(ev.with_params(params), bench, max_new_tokens=max_new_tokens, with_mia=False)
        table[name] = {
            "forget P": summary["forget"]["prob"],
            "forget ROUGE": summary["forget"]["rouge"],
            "forget TR": summary["forget"]["truth_ratio"],
            "retain P": summary["retain"]["prob"],
            "retain ROUGE": summary["retain"]["rouge"],
            "utility": summary["model_utility"] if summary["model_utility"] is not None else float("nan"),
        }
    return table


def format_metrics(table: dict) -> str:
    cols = list(next(iter(table.values())))
    head = f"{'model':<20}" + "".join(f"{c:>14}" for c in cols)
    lines = [head, "-" * len(head)]
    lines += [f"{name:<20}" + "".join(f"{row[c]:>14.3f}" for c in cols) for name, row in table.items()]
    return "\n".join(lines)


def format_table(table: dict) -> str:
    splits = list(next(iter(table.values())))
    head = f"{'model':<20}" + "".join(f"{s + ' NLL':>14}{s + ' P':>12}" for s in splits)
    lines = [head, "-" * len(head)]
    for name, row in table.items():
        lines.append(f"{name:<20}" + "".join(f"{row[s][0]:>14.3f}{row[s][1]:>12.3f}" for s in splits))
    return "\n".join(lines)


class PhaseTimer:
    """Wall-clock seconds per named phase, in order: `with timer("name"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def format(self) -> str:
        total = sum(self.seconds.values())
        lines = [f"  {name:<36}{secs:>7.1f} s" for name, secs in self.seconds.items()]
        return "\n".join(["time per phase:"] + lines + [f"  {'total':<36}{total:>7.1f} s"])


def run_demo(out: str | pathlib.Path, fast: bool = False, tofu: bool = True, log=print) -> dict:
    """Fine-tune, unlearn, extrapolate and evaluate; returns the before/after table."""
    from jaxunlearn import rundir, runner

    out = pathlib.Path(out)
    cfgs = demo_configs(fast)
    cfg = cfgs["unlearn"]
    timer = PhaseTimer()
    log(f"[1/3] fine-tuning the reference on the synthetic benchmark -> {out / 'reference'}")
    with timer("fine-tune the reference"):
        runner.finetune(cfgs["finetune"], out / "reference", split="full")
    log(f"      done in {timer.seconds['fine-tune the reference']:.0f}s")
    log(f"[2/3] MOX: memorise the forget set, extrapolate alpha={cfg.method.params.alpha:g} -> {out / 'unlearn'}")
    with timer("MOX: memorise + extrapolate"):
        runner.unlearn(cfg, out / "unlearn", reference=str(out / "reference"))
    log(f"      done in {timer.seconds['MOX: memorise + extrapolate']:.0f}s")
    log("[3/3] evaluating (mean answer NLL and P(a|q) = exp(-NLL), per split)")
    with timer("load benchmark, tokenizer, models"):
        bench = rundir.load_benchmark(cfg.data)
        tokenizer = rundir.load_tokenizer(cfg, bench)
        setup, models = load_models(out, cfg)
    with timer("evaluate: NLL table"):
        table = before_after(setup, models, cfg, bench, tokenizer)
    log("")
    log(format_table(table))
    ck.append_metrics(out / "unlearn", {"event": "demo_table", "table": table})
    if tofu:
        log("\nTOFU-style metrics (jaxunlearn.evals; TR = truth-ratio score, ROUGE = ROUGE-L recall of greedy answers)")
        with timer("evaluate: TOFU metrics (generation)"):
            metrics = tofu_style(setup, models, cfg, bench, tokenizer)
        log(format_metrics(metrics))
        ck.append_metrics(out / "unlearn", {"event": "demo_tofu", "table": metrics})
    log("\n" + timer.format())
    ck.append_metrics(out / "unlearn", {"event": "demo_seconds", "seconds": timer.seconds})
    log(f"run directories under {out}")
    return table


def forgot_more_than_lost(table: dict) -> tuple[bool, float, float]:
    """(ok, forget NLL increase, retain NLL increase) from the reference to the forget model."""
    ref, forget = list(table.values())[:2]
    d_forget = forget["forget"][0] - ref["forget"][0]
    d_retain = forget["retain"][0] - ref["retain"][0]
    return d_forget > max(d_retain, 0.0), d_forget, d_retain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jaxunlearn demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="jaxunlearn-demo", help="output folder (default: ./jaxunlearn-demo)")
    p.add_argument("--fast", action="store_true", help="shorter training (for tests)")
    p.add_argument("--no-tofu", action="store_true", help="skip the TOFU-style metrics (generation)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    from jaxunlearn.errors import RunError

    table = run_demo(a.out, a.fast, tofu=not a.no_tofu)
    ok, d_forget, d_retain = forgot_more_than_lost(table)
    print(f"forget NLL +{d_forget:.3f} vs retain NLL {d_retain:+.3f}: " + ("OK" if ok else "NOT forgetting"))
    if not ok and not a.fast:
        raise RunError(f"the forget model did not forget more than it lost on retain "
                       f"(forget NLL {d_forget:+.3f}, retain NLL {d_retain:+.3f})")
    return 0
