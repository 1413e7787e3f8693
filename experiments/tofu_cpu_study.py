"""Does MOX beat gradient ascent on real TOFU? A from-scratch study that runs on a 2-core CPU.

    python experiments/tofu_cpu_study.py [--tofu-dir DIR] [--work runs/tofu_cpu] [--out experiments/results/tofu_cpu]
    python experiments/tofu_cpu_study.py --probe    # time a few training steps and one evaluation; print the plan
    python experiments/tofu_cpu_study.py --tiny     # a few rows, a tiny model, few steps: the same code path (CI)

Stages (each skipped when its output is complete, so rerunning after a kill resumes):
 1. a byte-level BPE tokenizer trained on every TOFU text (`tokenizers`), saved in WORK/tokenizer and
    beside the model (WORK/init, a random Llama of --layers x --hidden in HF layout);
 2. the reference: that model trained from scratch on TOFU `full` (WORK/reference); its greedy answers on
    forget10 should reproduce the data (ROUGE-L recall > 0.9; the report says whether they do);
 3. the retain model: the same on `retain90` (WORK/retain); its forget10 truth ratios define forget quality;
 4. forget10 unlearned from the reference by every method of experiments/paper/common.py METHODS with its
    published defaults and the paper's schedule (AdamW, weight decay 0.01, batch 32, --unlearn-epochs with
    one warm-up epoch then linear decay) at the learning rate scaled to this model (--unlearn-lr: the
    paper's unlearning / fine-tuning ratio, 1e-5 / 2e-5 for Phi-1.5, times --ref-lr), a checkpoint per epoch.
    MOX and MOX momentum share one memorisation run (momentum changes only what is extrapolated);
    the alpha sweep comes from that same run;
 5. `jaxunlearn eval` of every method at every epoch (forget quality vs the retain model, model utility,
    forget / retain ROUGE, MIA AUCs forget10 vs holdout10);
 6. OUT: results.md (the paper's layout), tradeoff.png, epochs.png, summaries/, configs/, command.txt,
    commands.sh (every jaxunlearn command run), timings.json.
TOFU is read from --tofu-dir (default: $JAXUNLEARN_TOFU_DIR or ../shared/data/tofu) and never copied
into the repository; --tiny writes its few-row subset into WORK.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "paper"))
import common as C  # noqa: E402

FORGET, RETAIN, HOLDOUT = "forget10", "retain90", "holdout10"
EVAL_SPLITS = ("forget10", "retain90", "holdout10", "full", "forget10_perturbed", "retain_perturbed",
               "real_authors_perturbed", "world_facts_perturbed")
TINY = dict(rows=16, layers=2, hidden=32, heads=2, vocab=512, max_len=128, batch=8, ref_epochs=2, ref_lr=3e-3,
            unlearn_epochs=2, unlearn_lr=1.5e-3, eval_batch=16, max_new_tokens=24)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tofu-dir", default=os.environ.get("JAXUNLEARN_TOFU_DIR", "../shared/data/tofu"))
    p.add_argument("--work", help="run directories and checkpoints, not committed (default runs/tofu_cpu[_tiny])")
    p.add_argument("--out", help="tables, plots, configs (default experiments/results/tofu_cpu[_tiny])")
    p.add_argument("--methods", nargs="+", choices=[m for m in C.METHODS if m != "MOX momentum"],
                   default=[m for m in C.METHODS if m != "MOX momentum"],
                   help="methods to run (MOX includes MOX momentum: one memorisation run)")
    p.add_argument("--tiny", action="store_true", help="a few rows, a tiny model, few steps (CI)")
    p.add_argument("--probe", action="store_true", help="time training steps and one evaluation, print the plan")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=192)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ref-epochs", type=int, default=10)
    p.add_argument("--ref-lr", type=float, default=3e-3)
    p.add_argument("--unlearn-epochs", type=int, default=5)
    p.add_argument("--unlearn-lr", type=float, help="default: --ref-lr x 1e-5 / 2e-5 (the paper's Phi-1.5 ratio)")
    p.add_argument("--alpha", type=float, default=4.0, help="MOX's reported alpha (the paper's default)")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, help="default: the longest forget/retain answer + 8 tokens")
    p.add_argument("--rows", type=int, default=0, help="--tiny: rows per split")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.argv = list(argv)
    if a.tiny:
        for k, v in TINY.items():
            setattr(a, k, v)
    suffix = "_tiny" if a.tiny else ""
    a.work, a.out = a.work or f"runs/tofu_cpu{suffix}", a.out or f"experiments/results/tofu_cpu{suffix}"
    a.unlearn_lr = a.unlearn_lr or a.ref_lr * 1e-5 / 2e-5
    a.work, a.out, a.tofu_dir = pathlib.Path(a.work), pathlib.Path(a.out), pathlib.Path(a.tofu_dir)
    return a


def subset(tofu: pathlib.Path, folder: pathlib.Path, n: int) -> pathlib.Path:
    """--tiny: the first n rows of every split the study reads (forget/retain/holdout taken from full's rows)."""
    if (folder / "full.jsonl").exists():
        return folder
    from jaxunlearn.data.tofu import load_tofu

    rows = {s: load_tofu(s, tofu)[:n] for s in EVAL_SPLITS}
    rows["full"] = rows[RETAIN] + rows[FORGET]  # full must hold both training sets
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for s, r in rows.items():
        (tmp / f"{s}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r))
    tmp.rename(folder)
    return folder


SETTINGS = ("tiny", "rows", "layers", "hidden", "heads", "vocab", "max_len", "batch", "ref_epochs", "ref_lr",
            "unlearn_epochs", "unlearn_lr", "alpha", "max_new_tokens", "seed")


def check_settings(a) -> None:
    """WORK/study.json records the settings that shape its models; a rerun with others is refused."""
    path, now = a.work / "study.json", {k: getattr(a, k) for k in SETTINGS}
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in SETTINGS if old.get(k) != now[k])
        if diff:
            sys.exit(f"{C.rel(path)}: this work folder was started with other settings ({', '.join(diff)}); "
                     "rerun with those or use another --work")
    else:
        C.write(path, json.dumps(now, indent=1) + "\n")


class Study:
    def __init__(self, a):
        from jaxunlearn.data.tofu import tofu_benchmark

        self.a, self.work, self.out = a, a.work, a.out
        timings = a.out / "timings.json"
        self.timings: dict[str, float] = json.loads(timings.read_text()) if timings.exists() else {}
        check_settings(a)
        C.use_compile_cache(self.work / "jax_cache")
        self.run = C.Runner(self.out / "commands.sh")
        data = subset(a.tofu_dir, self.work / "tofu_subset", a.rows) if a.tiny else a.tofu_dir
        self.data = data
        self.bench = tofu_benchmark(FORGET, data)
        self.tokenizer = C.bpe_tokenizer(self.bench, self.work / "tokenizer", a.vocab)
        self.init = C.random_llama(self.work / "init", self.tokenizer, a.layers, a.hidden, a.heads, a.seed)
        self.spe = -(-len(self.bench.forget) // a.batch)  # unlearning steps per epoch (forget batches)
        answers = [" " + r["answer"] for r in self.bench.forget + self.bench.retain_perturbed]
        lengths = [len(ids) for ids in self.tokenizer(answers)["input_ids"]]
        self.max_new = a.max_new_tokens or max(lengths) + 8

    def timed(self, name, fn, *args):
        t = time.time()
        out = fn(*args)
        if name not in self.timings:
            self.timings[name] = round(time.time() - t, 1)
            C.write(self.out / "timings.json", json.dumps(self.timings, indent=1) + "\n")
        return out

    def data_overrides(self) -> list[str]:
        from jaxunlearn.data.batching import bucket_ladder

        a = self.a
        buckets = bucket_ladder(a.max_len)
        return ["data.benchmark=tofu", f"data.source={C.rel(self.data)}", f"data.forget_split={FORGET}",
                f"data.tokenizer={C.rel(self.work / 'tokenizer')}", f"data.max_len={a.max_len}",
                f"data.buckets=[{','.join(map(str, buckets))}]", "data.prompt_format=qa"]

    def train_overrides(self, lr: float, epochs: int, steps_per_epoch: int) -> list[str]:
        a = self.a
        return [f"train.lr={lr}", f"train.epochs={epochs}", f"train.batch_size={a.batch}", "train.weight_decay=0.01",
                "train.warmup_epochs=1", f"train.seed={a.seed}", f"checkpoint.save_every={steps_per_epoch}",
                f"checkpoint.keep={epochs}", f"model.hf_folder={C.rel(self.init)}"]

    def eval_args(self) -> list[str]:
        return ["--max-len", str(self.a.max_len), "--max-new-tokens", str(self.max_new),
                "--batch-size", str(self.a.eval_batch)]

    # ------------------------------------------------------------------ stages

    def base_models(self):
        a = self.a
        for name, split, rows in (("reference", "full", self.bench.full), ("retain", "retain", self.bench.retain)):
            spe = -(-len(rows) // a.batch)
            over = self.data_overrides() + self.train_overrides(a.ref_lr, a.ref_epochs, spe)
            self.timed(f"train {name}", self.run.finetune, self.work / name, split, over)
        ev = self.work / "eval"
        retain = self.timed("eval retain", self.run.evaluate, self.work / "retain", ev / "retain", "reference",
                            "--which", "reference", *self.eval_args())
        self.retain_results = ev / "retain" / "reference.per_sample.json"
        ref = self.timed("eval reference", self.run.evaluate, self.work / "reference", ev / "reference", "reference",
                         "--which", "reference", "--retain-results", self.retain_results, *self.eval_args())
        return ref, retain

    def methods(self) -> dict[str, list[tuple[int, dict]]]:
        """Train every method and evaluate it at every epoch: {row name: [(epoch, summary)]}."""
        a, series = self.a, {}
        for name in a.methods:
            overrides = C.METHODS[name]
            run = self.work / "methods" / C.slug(name)
            over = list(overrides)
            if name == "MOX":
                over += ["method.momentum=true", f"method.alpha={a.alpha}",
                         f"method.alphas=[{','.join(map(str, C.MOX_ALPHAS))}]"]
            over += self.data_overrides() + self.train_overrides(a.unlearn_lr, a.unlearn_epochs, self.spe)
            self.timed(f"train {name}", self.run.unlearn, run, self.work / "reference", over)
            series[name] = self.timed(f"eval {name}", self.per_epoch, name, run)
        return series

    def evaluate(self, run, out, label, *which):
        return self.run.evaluate(run, out, label, "--which", *which, "--retain-results", self.retain_results,
                                 *self.eval_args())

    def per_epoch(self, name: str, run: pathlib.Path) -> list[tuple[int, dict]]:
        a, ev, pts = self.a, self.work / "eval" / C.slug(name), []
        alpha = a.alpha if name == "MOX" else 1.0  # task vector: MUSE's negation scale 1 (its default)
        label = f"alpha_{alpha}"
        for e in range(1, a.unlearn_epochs + 1):
            out, step = ev / f"epoch_{e}", e * self.spe
            if name not in C.EXTRAPOLATED:
                pts.append((e, self.evaluate(run, out, "trained", "trained", "--step", str(step))))
            elif e < a.unlearn_epochs:
                if not (out / f"{label}.summary.json").exists():
                    self.run("extrapolate", "--run", run, "--alpha", alpha, "--step", step, "--overwrite")
                pts.append((e, self.evaluate(run, out, label, "forget", "--alpha", str(alpha))))
        if name in C.EXTRAPOLATED:  # the final step (also restores the result model after the epochs above)
            alphas = C.MOX_ALPHAS if name == "MOX" else (alpha,)
            self.run("extrapolate", "--run", run, "--alpha", *alphas, "--overwrite")
            pts.append((a.unlearn_epochs, self.evaluate(run, ev / f"epoch_{a.unlearn_epochs}", label, "forget",
                                                        "--alpha", str(alpha))))
        if name == "MOX":
            self.sweep = [(x, pts[-1][1] if x == alpha else
                           self.evaluate(run, ev / "sweep", f"alpha_{float(x)}", "forget", "--alpha", str(x)))
                          for x in C.MOX_ALPHAS]
            self.momentum = self.evaluate(run, ev / "momentum", "mox", "result")
        return pts

    # ------------------------------------------------------------------ report

    def report(self, ref, retain, series):
        a, out = self.a, self.out
        final = {"Original (reference)": ref, "Retrained (retain90)": retain}
        final.update({n if n != "MOX" else f"MOX α={a.alpha:g}": pts[-1][1] for n, pts in series.items()})
        if "MOX" in series:
            final["MOX momentum"] = self.momentum
        cols = C.TOFU_COLUMNS + C.MIA_COLUMNS
        by_epoch = [(f"{n} epoch {e}", s) for n, pts in series.items() for e, s in pts]
        sweep = [(f"α={x:g}", s) for x, s in getattr(self, "sweep", [])]
        ref_rouge = C.lookup(ref, ("forget", "rouge"))
        text = [f"# TOFU forget10 from scratch on CPU{' (--tiny)' if a.tiny else ''}\n",
                f"Reference forget10 ROUGE-L recall: {C.fmt(ref_rouge)} "
                f"({'reproduces' if (ref_rouge or 0) > 0.9 else 'does NOT reproduce'} the forget answers: "
                "> 0.9 needed).\n",
                "## Final epoch (the paper's layout)\n", C.table(final.items(), cols),
                "\n## MOX alpha sweep (one memorisation run)\n", C.table(sweep, cols, "alpha"),
                "\n## Every epoch\n", "MOX is the linear forget model (alpha as above) from each epoch's memorisation "
                "checkpoint; MOX momentum is evaluated at the final epoch only (its running model is kept in the "
                "checkpoints, not written per epoch). FQ of the retrained model is 1 by definition (n/a here).\n\n",
                C.table(by_epoch, cols, "method, epoch")]
        C.write(out / "results.md", "\n".join(text))
        C.plot_tradeoff(final, getattr(self, "sweep", []), out / "tradeoff.png",
                        f"TOFU forget10, {a.layers}x{a.hidden} Llama from scratch")
        C.plot_epochs(series, cols[:4] + cols[-1:], out / "epochs.png", "metrics per unlearning epoch")
        summaries = out / "summaries"
        for f in (self.work / "eval").rglob("*.summary.json"):
            dest = summaries / f.relative_to(self.work / "eval")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
        for cfg in self.work.rglob("config.yaml"):
            name = str(cfg.parent.relative_to(self.work)).replace(os.sep, "__")
            (out / "configs").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cfg, out / "configs" / f"{name}.yaml")
        C.write(out / "command.txt", shlex.join(["python", "experiments/tofu_cpu_study.py", *a.argv]) + "\n")
        print(f"wrote {C.rel(out / 'results.md')}")


def probe(study: Study) -> None:
    """Time reference training (two lengths, to separate compilation) and one evaluation; print the plan.

    Wall seconds depend on what else runs; CPU seconds of this process (all its threads) do much less:
    on an otherwise idle machine the wall time is about CPU seconds / cores used."""
    a, work = study.a, study.work / "probe"
    study.run.log = study.out / "probe_commands.sh"
    spe = -(-len(study.bench.full) // a.batch)
    over = study.data_overrides() + study.train_overrides(a.ref_lr, 1, spe)

    def clock(fn, *args):
        t, c = time.time(), time.process_time()
        fn(*args)
        return time.time() - t, time.process_time() - c

    runs = {n: clock(study.run.finetune, work / f"steps_{n}", "full", over + [f"train.max_steps={n}"]) for n in (2, 12)}
    step = [(runs[12][i] - runs[2][i]) / 10 for i in (0, 1)]
    ev = clock(study.run.evaluate, work / "steps_12", work / "eval", "reference", "--which", "reference",
               *study.eval_args())
    n_evals = 3 + (len(C.METHODS) - 1) * a.unlearn_epochs + len(C.MOX_ALPHAS) - 1
    ref_steps = spe * a.ref_epochs * (1 + len(study.bench.retain) / len(study.bench.full))
    unl_steps = 2.3 * study.spe * a.unlearn_epochs * (len(C.METHODS) - 1)  # forget + retain + reference passes
    minutes = lambda i: {"reference+retain": round(step[i] * ref_steps / 60, 1),  # noqa: E731
                         "unlearning": round(step[i] * unl_steps / 60, 1), "evaluation": round(ev[i] * n_evals / 60, 1)}
    plan = {"seconds per batch-%d step (wall, cpu)" % a.batch: [round(x, 2) for x in step],
            "steps per epoch of full": spe, "one evaluation incl. compile (wall, cpu)": [round(x, 1) for x in ev],
            "evaluations": n_evals, "estimate, minutes from wall": minutes(0), "estimate, minutes from cpu": minutes(1),
            "load average": os.getloadavg(), "cpu count": os.cpu_count()}
    print(json.dumps(plan, indent=1))
    C.write(study.out / "probe.json", json.dumps(plan, indent=1) + "\n")


def main(argv=None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    study = Study(a)
    if a.probe:
        probe(study)
        return 0
    ref, retain = study.base_models()
    series = study.methods()
    study.report(ref, retain, series)
    return 0


if __name__ == "__main__":
    sys.exit(main())
