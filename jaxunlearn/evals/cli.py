"""`jaxunlearn eval`: TOFU (or MUSE) evaluation of a run directory or a Hugging Face folder.

    jaxunlearn eval RUN [data.KEY=VALUE ...] [--which result reference trained forget sweep] [--alpha A ...] [--out DIR]
    jaxunlearn eval HF_FOLDER --benchmark tofu --data-source DIR [--forget-split forget10] --out DIR
    jaxunlearn eval HF_FOLDER --benchmark muse --data-source DIR [--retrain-auc X] --out DIR

A run directory (RUN/config.yaml, see jaxunlearn.checkpoint) brings its own tokenizer and data
settings (benchmark, split, prompt format, max_len, buckets; the data options only override them); `--which result` (the default) evaluates the run's result model (RUN/result.json:
the trained model of a gradient method, the forget model of MOX / task vector) labelled with the
method's name; `--which sweep` evaluates every forget model in RUN/forget (an alpha sweep). An HF
folder is loaded with jaxunlearn.models.load_hf and its own tokenizer (or --tokenizer), with the data
settings export-hf recorded in it (else TOFU, max_len 512). The benchmark's loader, evaluation and
report columns come from its entry in jaxunlearn.data.benchmarks.

Writes, per evaluated model LABEL: OUT/LABEL.summary.json and OUT/LABEL.per_sample.json; then
OUT/results.md (a markdown table of every summary in OUT), OUT/tradeoff.png (forget quality vs model
utility) and, for a run, OUT/training.png (metrics.jsonl over steps). Forget quality needs the retain
model's per-sample file (--retain-results RETAIN_OUT/LABEL.per_sample.json); without it it is n/a.
Reports cover every *.summary.json in OUT, so evaluating several runs (methods) into one --out folder
gives one table and one trade-off plot across methods (points grouped by the run's method name).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from jaxunlearn.evals.tofu import EvalError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxunlearn eval", description="evaluate a run directory or an HF folder")
    p.add_argument("target", help="run directory (with config.yaml) or Hugging Face model folder")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE | eval.KEY=VALUE",
                   help="override the run's (or the export record's) data and eval settings, as in the run config")
    p.add_argument("--which", nargs="+", default=["result"],
                   help="for a run: any of result (the method's result model, default), reference, trained "
                        "(memorized), forget, sweep (every alpha in RUN/forget)")
    p.add_argument("--alpha", type=float, nargs="+", help="for --which forget: alphas (default: the run's method.alpha)")
    p.add_argument("--step", type=int, help="for --which memorized: the step (default: latest)")
    p.add_argument("--benchmark", help="a registered benchmark (jaxunlearn.data.benchmarks: synthetic, tofu, muse); "
                                       "HF folder: default the one recorded by export-hf, else tofu")
    p.add_argument("--data-source", help="local data folder (TOFU JSONL or MUSE layout); default: the run's, else the hub")
    p.add_argument("--forget-split", help="forget split (default: the run's, or the one recorded by export-hf, "
                                          "else forget10)")
    p.add_argument("--synthetic-seed", type=int, help="(default: the run's, or recorded by export-hf, else 0)")
    p.add_argument("--synthetic-entities", type=int, help="(default: the run's, or recorded by export-hf, else 20)")
    p.add_argument("--muse-corpus", help="news or books (default: the run's, else news)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the run's, or the model's folder)")
    p.add_argument("--prompt-format", help="qa, llama2-chat or chat (default: the run's, else from the tokenizer)")
    p.add_argument("--retain-results", help="retain model's per-sample JSON (enables forget quality)")
    p.add_argument("--retrain-auc", type=float,
                   help="MUSE: a retrained model's Min-K%% forget-vs-holdout AUC in MUSE's convention (its "
                        "summary's privleak_auc); default: MUSE's published value (news 0.4772, books 0.5393)")
    p.add_argument("--out", help="output folder (default RUN/eval for a run; required for an HF folder)")
    p.add_argument("--max-new-tokens", type=int, help="(default: the run's eval.max_new_tokens, else 200)")
    p.add_argument("--max-len", type=int, help="longest scored sequence (default: the run's data.max_len; HF "
                                               "folder: recorded by export-hf, else 512)")
    p.add_argument("--batch-size", type=int, help="(default: the run's eval.batch_size, else 16)")
    p.add_argument("--mesh-data", type=int, default=-1, help="data-parallel mesh size (-1: all devices)")
    p.add_argument("--no-mia", action="store_true", default=None,
                   help="skip the forget-vs-holdout MIA AUCs (default: the run's eval.mia)")
    p.add_argument("--label", help="label of the evaluated model (HF folder; default: the folder name)")
    return p


# eval option -> the DataSpec field it overrides
DATA_FLAGS = (("benchmark", "benchmark"), ("data_source", "source"), ("forget_split", "forget_split"),
              ("synthetic_seed", "synthetic_seed"), ("synthetic_entities", "synthetic_entities"),
              ("muse_corpus", "corpus"), ("tokenizer", "tokenizer"), ("prompt_format", "prompt_format"),
              ("max_len", "max_len"))
# DataSpec fields that decide which rows are evaluated: an option that differs from the export record is warned about
BENCHMARK_FIELDS = ("benchmark", "forget_split", "synthetic_seed", "synthetic_entities", "corpus")
HF_MAX_LEN = 512  # an HF folder's max_len when neither --max-len nor an export record gives one


def data_spec(args, base):
    """`base` (a DataSpec: the run's data settings) with the data options and `data.KEY=VALUE`
    overrides given on the command line (the options win); a max_len changed without buckets gets
    the doubling bucket ladder of data.batching.bucket_ladder."""
    from jaxunlearn.config import ConfigError, from_dict, parse_override, to_dict
    from jaxunlearn.data.batching import bucket_ladder

    data = to_dict(base)
    for text in getattr(args, "overrides", None) or ():
        path, value = parse_override(text)
        if path[0] not in ("data", "eval") or len(path) != 2:
            raise ConfigError(f"override {text!r}: eval takes data.KEY=VALUE and eval.KEY=VALUE overrides only")
        if path[0] == "data":
            data[path[1]] = value
    data.update({field: getattr(args, flag) for flag, field in DATA_FLAGS if getattr(args, flag) is not None})
    if data["max_len"] != base.max_len and data["buckets"] == list(base.buckets):
        data["buckets"] = list(bucket_ladder(data["max_len"]))
    return from_dict({"data": data}, where="eval").data


def apply_eval_spec(args, base) -> None:
    """Fill the options not given on the command line from `base` (an EvalSpec: the run's eval section)
    with its eval.KEY=VALUE overrides applied; options given win."""
    from jaxunlearn.config import RunConfig, apply_overrides

    texts = [t for t in getattr(args, "overrides", None) or () if t.split("=", 1)[0].startswith("eval.")]
    spec = apply_overrides(RunConfig(eval=base), texts).eval
    if args.max_new_tokens is None:
        args.max_new_tokens = spec.max_new_tokens
    if args.batch_size is None:
        args.batch_size = spec.batch_size
    if args.no_mia is None:
        args.no_mia = not spec.mia


def _write(out: pathlib.Path, label: str, summary: dict, per_sample: dict) -> None:
    """Process 0 writes (every process evaluated); each file atomically, so a killed eval never leaves a
    truncated summary that write_reports would later read."""
    from jaxunlearn import checkpoint as ck
    from jaxunlearn.distributed import is_primary

    if not is_primary():
        return
    out.mkdir(parents=True, exist_ok=True)
    ck.write_text_atomic(out / f"{label}.per_sample.json", json.dumps(per_sample, ensure_ascii=False) + "\n")
    ck.write_text_atomic(out / f"{label}.summary.json", json.dumps(summary, indent=1, sort_keys=False) + "\n")
    print(f"wrote {out / (label + '.summary.json')}")


def _evaluate(ev, bench, spec, args, label: str, extra: dict | None = None) -> dict:
    from jaxunlearn.config import to_dict
    from jaxunlearn.data.benchmarks import get_benchmark

    summary, per_sample = get_benchmark(spec.benchmark).evaluation()(ev, bench, args, label)
    summary["benchmark_kind"] = spec.benchmark  # the registry name: write_reports picks its table columns by it
    summary["data"] = to_dict(spec)  # the data settings evaluated with (the run's, with the options given)
    summary.update(extra or {})
    _write(pathlib.Path(args.out), label, summary, per_sample)
    return summary


def _hf_target(args) -> list[tuple[str, str, dict]]:
    from transformers import AutoTokenizer

    from jaxunlearn import data, rundir
    from jaxunlearn.config import EvalSpec
    from jaxunlearn.evals.evaluator import Evaluator
    from jaxunlearn.models import load_hf, split_params
    from jaxunlearn.sharding import make_mesh

    folder = pathlib.Path(args.target)
    if args.out is None:
        raise EvalError("--out is required when evaluating a Hugging Face folder")
    spec = data_spec(args, _export_data_spec(args, folder))
    apply_eval_spec(args, EvalSpec())
    bench = rundir.load_benchmark(spec, "eval")
    tok_dir = pathlib.Path(spec.tokenizer or folder)
    if spec.tokenizer is None and not (tok_dir / "tokenizer.json").exists():  # the built-in tokenizer
        from jaxunlearn.data.benchmarks import get_benchmark

        tok = data.synthetic_tokenizer(rundir.load_benchmark(get_benchmark(spec.benchmark).tokenizer_spec(spec)))
    else:
        if not tok_dir.is_dir():
            raise EvalError(f"tokenizer folder not found: {tok_dir}")
        tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = load_hf(folder)
    if len(tok) > model.config.vocab_size:
        raise EvalError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}; pass the model's own tokenizer (--tokenizer)")
    graphdef, params = split_params(model)
    fmt = data.prompt_format_for(tok, spec.prompt_format)
    ev = Evaluator.create(graphdef, params, model.config, tok, fmt, mesh=make_mesh(data=args.mesh_data),
                          batch_size=args.batch_size, buckets=spec.buckets, max_len=spec.max_len)
    label = args.label or folder.name
    return [(label, "hf", _evaluate(ev, bench, spec, args, label))]


def _export_data_spec(args, folder: pathlib.Path):
    """The data settings `export-hf` recorded in the folder (defaults: benchmark tofu, max_len 512 and
    DataSpec's); warns when a given option differs from them (the numbers then do not describe the
    run's benchmark)."""
    from jaxunlearn.config import DataSpec, from_dict
    from jaxunlearn.data.batching import bucket_ladder
    from jaxunlearn.models.hf import EXPORT_MARKER

    record = {}
    if (folder / EXPORT_MARKER).is_file():
        record = (json.loads((folder / EXPORT_MARKER).read_text()) or {}).get("data") or {}
    if not record:
        return DataSpec(benchmark="tofu", max_len=HF_MAX_LEN, buckets=bucket_ladder(HF_MAX_LEN))
    for flag, field in DATA_FLAGS:
        given, recorded = getattr(args, flag), record.get(field)
        if given is not None and recorded is not None and given != recorded and field in BENCHMARK_FIELDS:
            print(f"jaxunlearn eval: warning: --{flag.replace('_', '-')} {given} differs from the {recorded} this model "
                  f"was trained with ({folder / EXPORT_MARKER}); results are not comparable with the run's", file=sys.stderr)
    return from_dict({"data": record}, where=str(folder / EXPORT_MARKER)).data


def _run_models(run: pathlib.Path, args, cfg) -> list[tuple[str, dict]]:
    """(label, load kwargs) of every model of the run that --which asks for, each once.

    Forget models are labelled by their folder name (alpha_A, or alpha_A_eta_E), so a model asked
    for twice (e.g. by `forget` and by `sweep`) is evaluated once."""
    from jaxunlearn import checkpoint as ck

    out: list[tuple[str, dict]] = []
    for which in args.which:
        if which == "result":
            out.append((cfg.method.name, {"which": "result"}))
        elif which == "reference":
            out.append(("reference", {"which": "reference"}))
        elif which in ("trained", "memorized"):
            out.append((which, {"which": which, "step": args.step}))
        elif which == "forget":
            for a in args.alpha or [cfg.method.params.alpha]:
                out.append((ck.forget_name(float(a)), {"which": "forget", "alpha": a}))
        elif which == "sweep":
            metas = ck.list_forget(run)
            if not metas:
                raise EvalError(f"{run / ck.FORGET_DIR}: no forget models to sweep")
            for m in metas:
                out.append((pathlib.Path(m["path"]).name, {"which": "forget", "alpha": m["alpha"], "eta": m.get("eta")}))
        else:
            raise EvalError(f"--which {which!r}: expected result, reference, trained, memorized, forget or sweep")
    first: dict[str, dict] = {}
    for label, kw in out:
        first.setdefault(label, kw)
    return list(first.items())


def _run_target(args) -> list[tuple[str, str, dict]]:
    from jaxunlearn import checkpoint as ck
    from jaxunlearn import data, rundir
    from jaxunlearn.evals.evaluator import Evaluator
    from jaxunlearn.sharding import batch_shards, batch_sharding, make_mesh

    run = pathlib.Path(args.target)
    cfg, _ = rundir.run_setup(run)
    args.out = args.out or str(run / "eval")
    spec = data_spec(args, cfg.data)  # the run's data settings; options given override them
    apply_eval_spec(args, cfg.eval)
    bench = rundir.load_benchmark(spec, "eval")
    tok = rundir.run_tokenizer(run)
    fmt = data.prompt_format_for(tok, spec.prompt_format)
    mesh = make_mesh(data=args.mesh_data)
    results, ev = [], None
    for label, kw in _run_models(run, args, cfg):
        setup, params, _ = rundir.load_run_params(run, mesh=mesh, **kw)
        if ev is None:
            shards = batch_shards(mesh)
            ev = Evaluator(setup.graphdef, params, setup.model_cfg, tok, fmt,
                           batch_size=-(-args.batch_size // shards) * shards, buckets=spec.buckets,
                           max_len=spec.max_len, param_shardings=setup.shardings, batch_sharding=batch_sharding(mesh))
        else:
            ev = ev.with_params(params)
        info = {"dir": str(run), "method": cfg.method.name, **{k: v for k, v in kw.items() if v is not None}}
        summary = _evaluate(ev, bench, spec, args, label, {"run": info})
        results.append((label, cfg.method.name, summary))
    from jaxunlearn.distributed import is_primary
    from jaxunlearn.evals.report import plot_training

    if is_primary():
        plot_training(ck.read_metrics(run), pathlib.Path(args.out) / "training.png")
    return results


def write_reports(out: pathlib.Path) -> None:
    """results.md (one table per benchmark kind, with the columns its registry entry names) and
    tradeoff.png (models with a model utility) from every *.summary.json in out."""
    from jaxunlearn.data.benchmarks import BENCHMARKS
    from jaxunlearn import checkpoint as ck
    from jaxunlearn.distributed import is_primary
    from jaxunlearn.evals.report import markdown_table, plot_tradeoff, sort_key

    if not is_primary():
        return
    rows = [(f.name[: -len(".summary.json")], ck.read_json(f)) for f in out.glob("*.summary.json")]
    rows.sort(key=lambda row: sort_key(*row))
    by_kind: dict[str, list] = {}
    for label, s in rows:  # summaries written before benchmark_kind existed: TOFU-shaped ones have "forget"
        kind = s.get("benchmark_kind") or ("tofu" if "forget" in s else None)
        if kind in BENCHMARKS:
            by_kind.setdefault(kind, []).append((label, s))
    if not by_kind:
        return
    tables = [(kind, markdown_table(kind_rows, BENCHMARKS[kind].columns)) for kind, kind_rows in by_kind.items()]
    text = tables[0][1] if len(tables) == 1 else "\n".join(f"## {kind}\n\n{table}" for kind, table in tables)
    ck.write_text_atomic(out / "results.md", text)
    points = [{"label": label, "method": (s.get("run") or {}).get("method", ""), "summary": s}
              for label, s in rows if s.get("model_utility") is not None]
    if points:
        plot_tradeoff(points, out / "tradeoff.png")
    print(f"wrote {out / 'results.md'}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    target = pathlib.Path(args.target)
    if (target / "config.yaml").is_file():
        results = _run_target(args)
    elif (target / "config.json").is_file():
        results = _hf_target(args)
    elif not target.exists():
        raise EvalError(f"{target}: no such run directory or model folder")
    else:
        raise EvalError(f"{target}: neither a run directory (config.yaml) nor an HF folder (config.json)")
    write_reports(pathlib.Path(args.out))
    for label, _, s in results:
        print(f"{label}: " + ", ".join(f"{k}={v:.4f}" for k, v in _headline(s).items()))
    return 0


def _headline(s: dict) -> dict[str, float]:
    keys = [("forget_quality",), ("model_utility",), ("forget", "rouge"), ("retain", "rouge"), ("priv_leak",),
            ("verbmem_forget",), ("knowmem_forget",), ("knowmem_retain",)]
    from jaxunlearn.evals.report import lookup

    out: dict[str, Any] = {}
    for k in keys:
        v = lookup(s, k)
        if isinstance(v, (int, float)):
            out["/".join(k)] = float(v)
    return out
