"""The benchmark registry: a benchmark's name -> how to load it, how to evaluate it, its report columns.

Every command that switches on `data.benchmark` looks the name up here: config validation, the run
directory (`rundir.load_benchmark`), `jaxunlearn data`, `jaxunlearn eval` and its reports. Adding a
benchmark is one module that calls `register_benchmark` (the built-in ones are registered below):

    register_benchmark(Benchmark(
        name="mine",
        load=lambda spec, purpose: my_loader(spec.source, spec.forget_split),
        evaluate="jaxunlearn.evals.tofu:evaluate_for_cli",
        columns=TOFU_COLUMNS,
    ))

`load(spec, purpose)` builds the benchmark from a `config.DataSpec`; purpose is "train" or "eval"
(MUSE loads its PrivLeak texts only for "eval"). `evaluate` names, as "module:function", a function
`f(evaluator, bench, options, label) -> (summary, per_sample)`, imported only when evaluating, so
that data code never imports evaluation code; `options` carries the eval command's settings
(max_new_tokens, retain_results, retrain_auc, no_mia). `columns` are the (title, path into the
summary) pairs of the results.md table. `tokenizer_spec(spec)` names the DataSpec whose texts build
the built-in tokenizer (synthetic: one tokenizer for every forget split).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from jaxunlearn.data.errors import DataError

PURPOSES = ("train", "eval")

# (column title, path into a summary) of the results.md table
TOFU_COLUMNS = (
    ("FQ", ("forget_quality",)),
    ("MU", ("model_utility",)),
    ("forget ROUGE", ("forget", "rouge")),
    ("forget prob", ("forget", "prob")),
    ("forget TR", ("forget", "truth_ratio")),
    ("forget ES", ("forget", "extraction_strength")),
    ("retain ROUGE", ("retain", "rouge")),
    ("retain prob", ("retain", "prob")),
    ("MIA Min-K++ AUC", ("mia", "min_k_pp_auc")),
)
MUSE_COLUMNS = (
    ("VerbMem forget", ("verbmem_forget",)),
    ("KnowMem forget", ("knowmem_forget",)),
    ("KnowMem retain", ("knowmem_retain",)),
    ("PrivLeak", ("priv_leak",)),
    ("Min-K% AUC", ("min_k_auc",)),
)

# synthetic benchmark forget splits, nested like TOFU's (forget01 in forget05 in forget10): the last
# 1, 2 or 4 authors (4: the generator's default); the holdout stays 4 authors, so every split has the
# same texts and hence the same tokenizer
SYNTHETIC_FORGET = {"forget01": 1, "forget05": 2, "forget10": 4}
SYNTHETIC_HOLDOUT = 4
SYNTHETIC_DEFAULT_SPLIT = "forget10"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One registered benchmark (see the module docstring)."""

    name: str
    load: Callable[[Any, str], Any]  # (DataSpec, purpose) -> UnlearnBenchmark (or MuseBenchmark)
    evaluate: str  # "module:function" (evaluator, bench, options, label) -> (summary, per_sample)
    columns: tuple[tuple[str, tuple[str, ...]], ...]
    tokenizer_spec: Callable[[Any], Any] = lambda spec: spec

    def evaluation(self) -> Callable:
        """The evaluation function, imported now."""
        module, _, func = self.evaluate.partition(":")
        return getattr(importlib.import_module(module), func)


BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(bench: Benchmark) -> Benchmark:
    """Add (or replace) a benchmark under bench.name; returns it."""
    if ":" not in bench.evaluate:
        raise ValueError(f"benchmark {bench.name!r}: evaluate must be 'module:function', got {bench.evaluate!r}")
    BENCHMARKS[bench.name] = bench
    return bench


def get_benchmark(name: str, where: str = "data.benchmark") -> Benchmark:
    """The registered benchmark `name`; a DataError naming `where` and the known names otherwise."""
    if name not in BENCHMARKS:
        raise DataError(f"{where}: unknown benchmark {name!r} (one of {'|'.join(BENCHMARKS)})")
    return BENCHMARKS[name]


def load(spec, purpose: str = "train"):
    """The benchmark a DataSpec names, loaded for `purpose` ("train" or "eval")."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    return get_benchmark(spec.benchmark).load(spec, purpose)


# ----------------------------------------------------------------------------- built-in benchmarks


def _synthetic(spec, purpose):
    from jaxunlearn.data.synthetic import synthetic_benchmark

    if spec.forget_split not in SYNTHETIC_FORGET:
        raise DataError(f"data.forget_split: the synthetic benchmark has {', '.join(SYNTHETIC_FORGET)}, "
                        f"got {spec.forget_split!r}")
    return synthetic_benchmark(seed=spec.synthetic_seed, n_entities=spec.synthetic_entities,
                               n_forget=SYNTHETIC_FORGET[spec.forget_split], n_holdout=SYNTHETIC_HOLDOUT)


def _tofu(spec, purpose):
    from jaxunlearn.data.tofu import tofu_benchmark

    return tofu_benchmark(spec.forget_split, source=spec.source)


def _muse(spec, purpose):
    from jaxunlearn.data.muse import muse_benchmark

    return muse_benchmark(spec.corpus, source=spec.source, privleak=purpose == "eval")


register_benchmark(Benchmark("synthetic", _synthetic, "jaxunlearn.evals.tofu:evaluate_for_cli", TOFU_COLUMNS,
                             lambda spec: dataclasses.replace(spec, forget_split=SYNTHETIC_DEFAULT_SPLIT)))
register_benchmark(Benchmark("tofu", _tofu, "jaxunlearn.evals.tofu:evaluate_for_cli", TOFU_COLUMNS))
register_benchmark(Benchmark("muse", _muse, "jaxunlearn.evals.muse:evaluate_for_cli", MUSE_COLUMNS))
