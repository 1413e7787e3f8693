"""The benchmark registry: a benchmark registered here (and nowhere else) is validated by the config,
listed by `jaxunlearn data`, trained on by `finetune` and evaluated by `eval` with its own evaluation
and report columns."""

import json

import numpy as np
import pytest

from jaxunlearn import cli
from jaxunlearn.config import ConfigError, load_config
from jaxunlearn.data import benchmarks
from jaxunlearn.data.benchmark import UnlearnBenchmark
from jaxunlearn.data.synthetic import synthetic_benchmark

TOY_COLUMNS = (("toy forget NLL", ("toy", "forget_nll")), ("toy forget rows", ("toy", "rows")))


def toy_load(spec, purpose):
    """Two authors of the synthetic generator, one of them forgotten; only its QA splits."""
    src = synthetic_benchmark(seed=spec.synthetic_seed, n_entities=spec.synthetic_entities, n_forget=1,
                              general_knowledge=False)
    return UnlearnBenchmark(name=f"toy-{purpose}", forget=src.forget, retain=src.retain, holdout=src.holdout,
                            forget_perturbed=src.forget_perturbed, retain_perturbed=src.retain_perturbed, full=src.full)


def toy_evaluate(ev, bench, options, label):
    """Mean answer NLL of the forget rows: the whole toy evaluation."""
    scores = ev.score_qa([(r["question"], r["answer"]) for r in bench.forget])
    nll = [float(-np.mean(s.logp)) for s in scores]
    return ({"model": label, "benchmark": bench.name, "toy": {"forget_nll": float(np.mean(nll)), "rows": len(nll)}},
            {"model": label, "forget_nll": nll})


@pytest.fixture
def toy():
    bench = benchmarks.register_benchmark(benchmarks.Benchmark("toy", toy_load, f"{__name__}:toy_evaluate", TOY_COLUMNS))
    yield bench
    del benchmarks.BENCHMARKS["toy"]


def test_builtins_are_registered():
    assert {"synthetic", "tofu", "muse"} <= set(benchmarks.BENCHMARKS)


def test_unknown_benchmark_is_a_config_error_naming_the_registered_ones(toy):
    with pytest.raises(ConfigError, match=r"data.benchmark: expected .*toy.*, got 'nope'"):
        load_config(None, ["data.benchmark=nope"])
    assert load_config(None, ["data.benchmark=toy"]).data.benchmark == "toy"


def test_data_command_loads_a_registered_benchmark(toy, capsys):
    assert cli.main(["data", "data.benchmark=toy", "data.synthetic_entities=3"]) == 0
    sizes = json.loads(capsys.readouterr().out)
    expected = toy_load(load_config(None, ["data.benchmark=toy", "data.synthetic_entities=3"]).data, "eval").sizes()
    assert sizes == expected and sizes["forget"] > 0


def test_finetune_and_eval_on_a_registered_benchmark(toy, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = ["data.benchmark=toy", "data.synthetic_entities=3", "data.max_len=64", "data.buckets=[64]",
                 "train.batch_size=8", "train.max_steps=2", "mesh.data=1"]
    assert cli.main(["finetune", *overrides, "--run", str(run)]) == 0, capsys.readouterr().err
    assert cli.main(["eval", str(run), "--which", "reference", "--batch-size", "8", "--mesh-data", "1"]) == 0, \
        capsys.readouterr().err
    summary = json.loads((run / "eval" / "reference.summary.json").read_text())
    assert summary["benchmark"] == "toy-eval" and summary["benchmark_kind"] == "toy"
    assert summary["toy"]["rows"] == len(toy_load(load_config(None, overrides).data, "eval").forget)
    assert np.isfinite(summary["toy"]["forget_nll"])
    assert summary["data"]["max_len"] == 64 and summary["data"]["synthetic_entities"] == 3  # the run's settings
    table = (run / "eval" / "results.md").read_text()
    assert "| toy forget NLL | toy forget rows |" in table and "| reference |" in table


def test_data_command_reads_a_config_file_or_run_and_keeps_its_old_flags(tmp_path, capsys):
    def sizes(*argv):
        assert cli.main(["data", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    expected = synthetic_benchmark(seed=1, n_entities=6, n_forget=2, n_holdout=benchmarks.SYNTHETIC_HOLDOUT).sizes()
    (tmp_path / "c.yaml").write_text("data:\n  synthetic_entities: 6\n  synthetic_seed: 1\n")
    assert sizes(str(tmp_path / "c.yaml"), "data.forget_split=forget05") == expected
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("data:\n  synthetic_entities: 6\n  synthetic_seed: 1\n"
                                                  "  forget_split: forget05\n")
    assert sizes(str(tmp_path / "run")) == expected  # a run directory: its config.yaml
    assert sizes("synthetic", "--seed", "1", "--n-entities", "6", "--n-forget", "2") == expected  # the old form
    assert sizes("synthetic") == sizes()  # the old form's defaults are the config's
    assert cli.main(["data", "synthetic", "--n-forget", "3"]) == 1
    assert "--n-forget" in capsys.readouterr().err
