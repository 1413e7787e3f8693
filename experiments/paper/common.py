"""What the experiment scripts share: running `jaxunlearn` commands resumably, the paper's methods,
small random models and built-in data for `--tiny`, reading evaluation summaries, tables and plots.

Every step goes through the `jaxunlearn` command line (run in this process, so imports and compiled
functions are shared), and every step is skipped when its output is already complete, so an
interrupted script is resumed by running it again:
  finetune / unlearn  skipped when RUN/result.json exists (else the command resumes its checkpoints)
  eval                skipped when OUT/LABEL.summary.json exists
Each command is appended to LOG (the exact commands a script ran, paths relative to the working folder).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shlex
from typing import Iterable, Mapping, Sequence

# The paper's methods (../shared/design/mox.md "Paper setup"), each as `jaxunlearn unlearn` overrides;
# every hyper-parameter not named here is the method's published default (jaxunlearn/methods/).
METHODS: dict[str, tuple[str, ...]] = {
    "GA": ("method=ga",),
    "GradDiff": ("method=graddiff",),
    "NPO": ("method=npo",),
    "SimNPO": ("method=simnpo",),
    "Task Vector": ("method=task_vector",),
    "MOX": ("method=mox",),
    "MOX momentum": ("method=mox", "method.momentum=true"),
}
MOX_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)
EXTRAPOLATED = ("Task Vector", "MOX")  # result = ref + alpha (ref - trained); per-epoch models need `extrapolate`


class StepFailed(RuntimeError):
    """A jaxunlearn command exited non-zero (its one-line error was printed above)."""


def slug(name: str) -> str:
    return name.lower().replace(" ", "_")


def rel(path) -> str:
    """A path as written into logs and tables: relative to the working folder when below it."""
    p = os.path.abspath(str(path))
    r = os.path.relpath(p)
    return p if r.startswith(".." + os.sep + "..") else r


class Runner:
    """Runs `jaxunlearn` commands in this process and logs them to `log` (one shell line each)."""

    def __init__(self, log: pathlib.Path | None = None, quiet: bool = False):
        self.log, self.quiet = log, quiet

    def __call__(self, *argv) -> None:
        from jaxunlearn import cli

        args = [rel(a) if isinstance(a, pathlib.Path) else str(a) for a in argv]
        line = shlex.join(["jaxunlearn", *args])
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "a") as f:
                f.write(line + "\n")
        if not self.quiet:
            print(f"$ {line}", flush=True)
        try:
            rc = cli.main(args)
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 2
        if rc:
            raise StepFailed(f"{line}: exit status {rc}")

    def finetune(self, run: pathlib.Path, split: str, overrides: Sequence[str], config: str | None = None) -> None:
        if not (run / "result.json").exists():
            self("finetune", *([config] if config else []), *overrides, "--run", run, "--split", split)

    def unlearn(self, run: pathlib.Path, reference: pathlib.Path | str, overrides: Sequence[str],
                config: str | None = None) -> None:
        if not (run / "result.json").exists():
            self("unlearn", *([config] if config else []), *overrides, "--run", run, "--reference", reference)

    def evaluate(self, target: pathlib.Path, out: pathlib.Path, label: str, *args) -> dict:
        """`jaxunlearn eval TARGET ... --out OUT` unless OUT/LABEL.summary.json exists; returns that summary."""
        path = out / f"{label}.summary.json"
        if not path.exists():
            self("eval", target, *args, "--out", out)
        if not path.exists():
            raise StepFailed(f"eval {rel(target)} wrote no {rel(path)}")
        return json.loads(path.read_text())


def use_compile_cache(folder: pathlib.Path) -> None:
    """The library's persistent compilation cache (jaxunlearn.compile_cache) in `folder`, unless
    JAXUNLEARN_COMPILE_CACHE already names a folder or `off`: the many evaluations of one model shape
    then compile once, also the jaxunlearn commands this process runs."""
    from jaxunlearn import compile_cache

    os.environ.setdefault(compile_cache.ENV, str(folder))
    compile_cache.enable()


# ----------------------------------------------------------------------------- models and data


def random_llama(folder: pathlib.Path, tokenizer, layers: int, hidden: int, heads: int, seed: int = 0) -> pathlib.Path:
    """A randomly initialised Llama-family HF folder (config.json, safetensors, tokenizer) sized for
    `tokenizer`: `layers` layers of width `hidden`, `heads` heads, MLP width 8/3 hidden (Llama's ratio)."""
    from jaxunlearn.models import ModelConfig, init_model
    from jaxunlearn.models.hf import export_hf

    if (folder / "config.json").exists():
        return folder
    cfg = ModelConfig.preset("tiny-llama", vocab_size=len(tokenizer), hidden_size=hidden,
                             intermediate_size=-(-8 * hidden // 3 // 32) * 32, num_layers=layers, num_heads=heads,
                             num_kv_heads=heads, head_dim=hidden // heads, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tmp = folder.with_name(folder.name + ".tmp")
    export_hf(init_model(cfg, seed), tmp)
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


def bpe_tokenizer(bench, folder: pathlib.Path, vocab_size: int):
    """A byte-level BPE tokenizer trained (`tokenizers`) on every text of `bench`, saved in `folder`."""
    from transformers import AutoTokenizer

    from jaxunlearn.data import synthetic_tokenizer

    if not (folder / "tokenizer.json").exists():
        tok = synthetic_tokenizer(bench, vocab_size=vocab_size, cache=folder.parent / (folder.name + ".cache"))
        tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tiny_model(work: pathlib.Path, name: str = "tiny-model", seed: int = 0) -> pathlib.Path:
    """--tiny: a random 2-layer, 32-wide Llama with the built-in (synthetic) benchmark's tokenizer."""
    from jaxunlearn.data import synthetic_tokenizer

    return random_llama(work / name, synthetic_tokenizer(0, vocab_size=512), layers=2, hidden=32, heads=2, seed=seed)


TINY_DATA = ("data.benchmark=synthetic", "data.synthetic_entities=20")
TINY_TRAIN = ("train.batch_size=8", "train.epochs=2", "train.lr=1e-3")


def tiny_muse_dir(folder: pathlib.Path) -> pathlib.Path:
    """--tiny: the built-in benchmark written in MUSE's folder layout (texts = question + answer)."""
    from jaxunlearn.data import synthetic_benchmark

    if (folder / "privleak" / "holdout.jsonl").exists():
        return folder
    b = synthetic_benchmark(seed=0, n_entities=20)
    text = lambda r: f"{r['question']} {r['answer']}"  # noqa: E731
    forget, retain, holdout = [text(r) for r in b.forget], [text(r) for r in b.retain], [text(r) for r in b.holdout]
    qa = lambda rows: [{"question": r["question"], "answer": r["answer"]} for r in rows]  # noqa: E731
    splits = {
        ("raw", "forget"): [{"text": t} for t in forget], ("raw", "retain1"): [{"text": t} for t in retain],
        ("raw", "retain2"): [{"text": t} for t in retain[:16]], ("raw", "holdout"): [{"text": t} for t in holdout],
        ("verbmem", "forget"): [{"prompt": r["question"], "gt": r["answer"]} for r in b.forget],
        ("knowmem", "forget_qa"): qa(b.forget), ("knowmem", "retain_qa"): qa(b.retain[:16]),
        ("knowmem", "forget_qa_icl"): qa(b.forget[:3]), ("knowmem", "retain_qa_icl"): qa(b.retain[:3]),
        ("privleak", "forget"): [{"text": t} for t in forget], ("privleak", "retain"): [{"text": t} for t in retain[:16]],
        ("privleak", "holdout"): [{"text": t} for t in holdout],
    }
    for (subset, split), rows in splits.items():
        (folder / subset).mkdir(parents=True, exist_ok=True)
        (folder / subset / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ----------------------------------------------------------------------------- summaries, tables, plots

# (column, path into a TOFU summary) in the paper's layout, then the MIA AUCs
TOFU_COLUMNS = (("FQ", ("forget_quality",)), ("MU", ("model_utility",)), ("forget ROUGE", ("forget", "rouge")),
                ("retain ROUGE", ("retain", "rouge")))
MIA_COLUMNS = tuple((f"MIA {k}", ("mia", f"{k}_auc")) for k in ("loss", "zlib", "min_k", "min_k_pp"))
MUSE_COLUMNS = (("VerbMem forget", ("verbmem_forget",)), ("KnowMem forget", ("knowmem_forget",)),
                ("KnowMem retain", ("knowmem_retain",)), ("PrivLeak", ("priv_leak",)))


def lookup(summary: Mapping, path: Sequence[str]):
    cur = summary
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)


def table(rows: Iterable[tuple[str, Mapping]], columns, first: str = "method") -> str:
    """A markdown table: one row per (name, summary), one column per (title, summary path)."""
    lines = ["| " + " | ".join([first, *(c for c, _ in columns)]) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join([name, *(fmt(lookup(s, p)) for _, p in columns)]) + " |" for name, s in rows]
    return "\n".join(lines) + "\n"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(points: Mapping[str, Mapping], curve: Sequence[tuple[float, Mapping]], path: pathlib.Path,
                  title: str) -> None:
    """Forget quality (log scale) against model utility: one point per method, the MOX alpha curve."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, s in points.items():
        fq, mu = s.get("forget_quality"), s.get("model_utility")
        if fq is not None and mu is not None:
            ax.scatter(mu, max(fq, 1e-30), label=name, zorder=3)
    good = [(a, s) for a, s in curve if s.get("forget_quality") is not None and s.get("model_utility") is not None]
    if good:
        ax.plot([s["model_utility"] for _, s in good], [max(s["forget_quality"], 1e-30) for _, s in good],
                "k--", lw=1, zorder=2, label="MOX alpha sweep")
        for a, s in good:
            ax.annotate(f"α={a:g}", (s["model_utility"], max(s["forget_quality"], 1e-30)), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value vs retain model)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_epochs(series: Mapping[str, Sequence[tuple[int, Mapping]]], columns, path: pathlib.Path, title: str) -> None:
    """Each metric against the epoch, one line per method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.4), squeeze=False)
    for ax, (name, key) in zip(axes[0], columns):
        for method, pts in series.items():
            xs = [(e, lookup(s, key)) for e, s in pts if lookup(s, key) is not None]
            if xs:
                ax.plot([e for e, _ in xs], [v for _, v in xs], marker="o", ms=3, label=method)
        if name == "FQ":
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------- the paper scripts' shared steps

# name -> (prompt format, fine-tuning lr on TOFU full): the paper's settings (../shared/design/mox.md
# "Paper setup": Phi lr 2e-5, Llama lr 1e-5, 5 epochs); Llama-3.2-1B-Instruct as open-unlearning (1e-5)
PAPER_MODELS = {"phi15": ("qa", 2e-5), "llama2chat": ("llama2-chat", 1e-5), "llama32": ("chat", 1e-5)}
TOFU_SPLITS = ("forget01", "forget05", "forget10")


def paper_args(description: str, argv, **defaults):
    """The options every paper script takes (see experiments/paper/README.md)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", action="append", default=[], metavar="NAME=HF_FOLDER",
                   help=f"a base model (repeat); NAME in {', '.join(PAPER_MODELS)} picks the paper's prompt format and lr")
    p.add_argument("--tofu-dir", default=os.environ.get("JAXUNLEARN_TOFU_DIR", "../shared/data/tofu"))
    p.add_argument("--work", default=defaults.get("work", "runs/paper"), help="run directories (shared by the scripts)")
    p.add_argument("--out", default=defaults.get("out"), help="where the table goes")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=10, help="unlearning epochs (the paper: 10)")
    p.add_argument("--lr", type=float, default=1e-5, help="unlearning lr (the paper: 1e-5)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra overrides for every training command (e.g. model.dtype=bfloat16 train.grad_accum=4)")
    p.add_argument("--tiny", action="store_true", help="random tiny model, built-in data, few steps (CI)")
    for k, v in defaults.get("extra", {}).items():
        p.add_argument(k, **v)
    a = p.parse_args(argv)
    if a.tiny:
        a.batch, a.max_len, a.eval_batch, a.max_new_tokens, a.epochs, a.lr = 8, 128, 16, 16, 2, 1e-3
    elif not a.model:
        p.error("give at least one --model NAME=HF_FOLDER (or --tiny)")
    a.work, a.out = pathlib.Path(a.work), pathlib.Path(a.out)
    return a


class Paper:
    """Reference, retain models, unlearning runs and evaluations laid out under WORK/MODEL/ so that the
    scripts share them: WORK/MODEL/reference, WORK/MODEL/SPLIT/{retain, METHOD, eval/...}."""

    def __init__(self, a):
        self.a = a
        use_compile_cache(a.work / "jax_cache")
        self.run = Runner(a.out / "commands.sh")
        if a.tiny:
            self.models = {"tiny": (str(tiny_model(a.work)), "qa", 1e-3)}
        else:
            self.models = {}
            for spec in a.model:
                name, _, folder = spec.partition("=")
                fmt, lr = PAPER_MODELS.get(name, (None, 1e-5))
                self.models[name] = (folder, fmt, lr)

    def data(self, model: str, split: str = "forget10") -> list[str]:
        from jaxunlearn.data.batching import bucket_ladder

        a, (_, fmt, _) = self.a, self.models[model]
        buckets = bucket_ladder(a.max_len, smallest=128)
        out = list(TINY_DATA) if a.tiny else ["data.benchmark=tofu", f"data.source={rel(a.tofu_dir)}"]
        out += [f"data.forget_split={split}", f"data.max_len={a.max_len}", f"data.buckets=[{','.join(map(str, buckets))}]"]
        return out + ([f"data.prompt_format={fmt}"] if fmt else [])

    def train(self, lr: float, epochs: int) -> list[str]:
        a = self.a
        return [f"train.lr={lr}", f"train.epochs={epochs}", f"train.batch_size={a.batch}", "train.weight_decay=0.01",
                "train.warmup_epochs=1", *a.set]

    def eval_args(self) -> list[str]:
        a = self.a
        return ["--max-len", str(a.max_len), "--max-new-tokens", str(a.max_new_tokens), "--batch-size", str(a.eval_batch)]

    def finetuned(self, model: str, split: str = "forget10", train_split: str = "full") -> pathlib.Path:
        """The model fine-tuned on TOFU `full` (the reference) or on the retain split of `split`."""
        folder, _, lr = self.models[model]
        run = self.a.work / model / ("reference" if train_split == "full" else f"{split}/retain")
        epochs = 2 if self.a.tiny else 5  # the paper: 5 epochs
        self.run.finetune(run, train_split, [f"model.hf_folder={folder}", *self.data(model, split),
                                             *self.train(lr, epochs)])
        return run

    def retain_model(self, model: str, split: str) -> tuple[pathlib.Path, dict]:
        """The retain model's per-sample results on `split` (what forget quality compares with) and summary."""
        run = self.finetuned(model, split, "retain")
        out = self.a.work / model / split / "eval" / "retain"
        summary = self.run.evaluate(run, out, "reference", "--which", "reference", *self.eval_args())
        return out / "reference.per_sample.json", summary

    def unlearn(self, model: str, split: str, method: str, extra=(), name: str | None = None,
                reference: pathlib.Path | None = None) -> pathlib.Path:
        """`jaxunlearn unlearn` of METHODS[method] (+ extra overrides) on `split` from the reference."""
        run = self.a.work / model / split / (name or slug(method))
        over = [*METHODS[method], *extra, *self.data(model, split), *self.train(self.a.lr, self.a.epochs)]
        self.run.unlearn(run, reference or self.finetuned(model), over)
        return run

    def tofu_eval(self, run: pathlib.Path, out: pathlib.Path, label: str, retain: pathlib.Path, *which) -> dict:
        return self.run.evaluate(run, out, label, "--which", *which, "--retain-results", retain, *self.eval_args())

    def method_models(self, model: str, split: str) -> list[tuple[str, pathlib.Path, tuple[str, ...], str]]:
        """(row, run, `--which` arguments, eval label) of every method's final model; MOX's run (with
        momentum) gives both MOX alpha=4 (linear) and MOX momentum."""
        out = []
        for method in self.a.methods:
            if method == "MOX momentum" and "MOX" in self.a.methods:
                continue
            run = self.unlearn(model, split, method, ("method.momentum=true",) if method == "MOX" else ())
            if method == "MOX":
                out.append(("MOX α=4", run, ("forget", "--alpha", "4"), "alpha_4.0"))
                out.append(("MOX momentum", run, ("result",), "mox"))
            else:
                out.append((method, run, ("result",), get_method_name(run)))
        return out

    def method_summaries(self, model: str, split: str) -> dict[str, dict]:
        """{row: summary} for the original and retain models and every method's final model."""
        ev = self.a.work / model / split / "eval"
        retain, retrained = self.retain_model(model, split)
        rows = {"Original": self.tofu_eval(self.finetuned(model), ev / "reference", "reference", retain, "reference"),
                "Retrained": retrained}
        for row, run, which, label in self.method_models(model, split):
            rows[row] = self.tofu_eval(run, ev / run.name, label, retain, *which)
        return rows


def get_method_name(run: pathlib.Path) -> str:
    """The label `jaxunlearn eval --which result` gives a run's result model: its method name."""
    return json.loads((run / "result.json").read_text())["method"]
