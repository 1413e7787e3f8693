"""CLI runs on a tiny config over 8 simulated devices: exact resume after SIGKILL, errors that
lose nothing (reference-hash mismatch, non-finite step, config mismatch), extrapolate, export-hf.

The CLI runs that matter for the kill test are subprocesses sharing a persistent compilation
cache, so the step function is compiled once for all of them.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from jaxunlearn import checkpoint as ck
from jaxunlearn import cli, runner
from jaxunlearn.config import from_dict

# tiny but real: 8-device data-parallel mesh, momentum on; 12 steps, a checkpoint every 3
TINY = {
    "data": {"synthetic_entities": 6, "max_len": 64, "buckets": [64]},
    "train": {"batch_size": 8, "epochs": 3, "lr": 1e-3},
    "method": {"name": "mox", "alpha": 4.0, "momentum": True, "eta": 0.5, "momentum_every": 2},
    "checkpoint": {"save_every": 3, "keep": 2},
}
TOTAL_STEPS = 12


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return root


def _env(work):
    env = dict(os.environ)
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(work / "xla-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


def _cmd(*args):
    return [sys.executable, "-m", "jaxunlearn.cli", *map(str, args)]


def _steps(run):
    d = run / ck.MEMORIZED_DIR
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.fixture(scope="module")
def runs(work):
    """(clean run, killed-then-resumed run, step it was killed after)."""
    cfg = work / "tiny.yaml"
    clean, killed = work / "clean", work / "killed"
    # the uninterrupted run goes alongside the one to be killed (XLA compiles on one core each)
    logs = [open(work / f"{run.name}.log", "wb") for run in (clean, killed)]
    procs = [subprocess.Popen(_cmd("unlearn", cfg, "--run", run), env=_env(work), stdout=log, stderr=log)
             for run, log in zip((clean, killed), logs)]
    deadline = time.time() + 300
    while not _steps(killed) and procs[1].poll() is None and time.time() < deadline:
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)
    assert procs[1].wait() == -signal.SIGKILL, (work / "killed.log").read_text()[-2000:]
    killed_at = _steps(killed)[-1]
    assert procs[0].wait() == 0, (work / "clean.log").read_text()[-2000:]
    for log in logs:
        log.close()

    done = subprocess.run(_cmd("unlearn", cfg, "--run", killed), env=_env(work), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return clean, killed, killed_at


def _params(run, which, **kw):
    _, params, info = runner.load_run_params(run, which, **kw)
    return jax.device_get(params), info


def _assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def _snapshot(root: pathlib.Path) -> dict:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def _last_err(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_killed_run_resumes_bitwise(runs):
    clean, killed, killed_at = runs
    assert 0 < killed_at < TOTAL_STEPS, "the run was not killed mid-way"
    assert _steps(clean)[-1] == _steps(killed)[-1] == TOTAL_STEPS
    resumes = [r for r in ck.read_metrics(killed) if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [killed_at]
    assert ck.reference_hash(clean) == ck.reference_hash(killed)
    _assert_bitwise(_params(killed, "memorized")[0], _params(clean, "memorized")[0])
    for eta in (None, TINY["method"]["eta"]):  # plain and momentum forget models
        (got, meta), (want, want_meta) = _params(killed, "forget", eta=eta), _params(clean, "forget", eta=eta)
        _assert_bitwise(got, want)
        assert meta["hash"] == want_meta["hash"] and meta["source_step"] == TOTAL_STEPS
    # memorisation did what it is for: forget NLL went down over the run
    nll = [r["forget_nll"] for r in ck.read_metrics(clean) if "forget_nll" in r]
    assert nll[-1] < nll[0]


def test_rerun_of_finished_run_changes_nothing(runs, work, capsys):
    clean = runs[0]
    before = _snapshot(clean / ck.FORGET_DIR)
    # checkpointing settings may change on a rerun: they do not change the result
    assert cli.main(["unlearn", str(work / "tiny.yaml"), "checkpoint.keep=5", "--run", str(clean)]) == 0
    assert _snapshot(clean / ck.FORGET_DIR) == before


def test_reference_hash_mismatch_stops_and_loses_nothing(runs, work, capsys):
    run = work / "tampered"
    shutil.copytree(runs[0], run)
    setup, params, _ = runner.load_run_params(run, "reference")
    params = jax.tree.map(lambda x: x * 1.001, params)
    shutil.rmtree(ck.reference_path(run) / ck.PARAMS_DIR)
    saver = ocp.StandardCheckpointer()
    saver.save(ck.reference_path(run) / ck.PARAMS_DIR, params)
    saver.wait_until_finished()
    before = _snapshot(run)
    assert cli.main(["unlearn", str(work / "tiny.yaml"), "--run", str(run)]) == 1
    assert cli.main(["extrapolate", "--run", str(run), "--alpha", "2"]) == 1
    err = _last_err(capsys)
    assert len(err) == 2 and all("content hash" in line for line in err), err
    assert _snapshot(run) == before


def test_non_finite_step_stops_and_keeps_last_good_checkpoint(work, capsys):
    run = work / "nonfinite"
    argv = [str(work / "tiny.yaml"), "train.lr=1e30", "checkpoint.save_every=1", "--run", str(run)]
    assert cli.main(["unlearn", *argv]) == 1
    err = _last_err(capsys)
    assert len(err) == 1 and "non-finite" in err[0], err
    steps = _steps(run)
    assert steps and steps[-1] < TOTAL_STEPS and not ck.list_forget(run)
    last, _ = _params(run, "memorized")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(last))


def test_config_errors_are_one_line(runs, work, capsys):
    clean = runs[0]
    before = _snapshot(clean)
    assert cli.main(["unlearn", str(work / "tiny.yaml"), "train.lr=0.5", "--run", str(clean)]) == 1
    assert cli.main(["unlearn", str(work / "tiny.yaml"), "train.nope=1", "--run", str(work / "x")]) == 1
    assert cli.main(["extrapolate", "--run", str(work / "missing"), "--alpha", "2"]) == 1
    assert cli.main(["unlearn", str(work / "nope.yaml"), "--run", str(work / "y")]) == 1
    assert cli.main(["finetune", str(work / "tiny.yaml"), "--split", "nope", "--run", str(work / "z")]) == 1
    err = _last_err(capsys)
    assert len(err) == 5 and "--split 'nope'" in err[4]
    assert not (work / "z").exists()
    assert "train.lr" in err[0] and "differs" in err[0]
    assert "train.nope" in err[1] and "does not exist" in err[2] and "nope.yaml" in err[3]
    assert _snapshot(clean) == before


def test_extrapolate_and_export_hf(runs, work):
    from jaxunlearn.models import hf, split_params

    clean = runs[0]
    assert cli.main(["extrapolate", "--run", str(clean), "--alpha", "2", "0.5"]) == 0
    ref, _ = _params(clean, "reference")
    mem, position = _params(clean, "memorized")
    for alpha in (2.0, 0.5):
        forget, meta = _params(clean, "forget", alpha=alpha)
        assert meta["alpha"] == alpha and meta["source_step"] == position["step"]
        for r, m, f in zip(jax.tree.leaves(ref), jax.tree.leaves(mem), jax.tree.leaves(forget)):
            np.testing.assert_allclose(f, r + alpha * (r - m), rtol=1e-6, atol=1e-7)
    out = work / "hf"
    assert cli.main(["export-hf", "--run", str(clean), "--which", "forget", "--alpha", "2", "--out", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    _, loaded = split_params(hf.load_hf(out))
    _assert_bitwise(jax.device_get(loaded), _params(clean, "forget", alpha=2.0)[0])


class _Stop(Exception):
    pass


def test_unknown_extrapolation_rule_fails_before_training(tmp_path, monkeypatch):
    def train_stage(*args, **kwargs):
        raise _Stop("training started")

    monkeypatch.setattr(runner, "train_stage", train_stage)
    cfg = from_dict(dict(TINY, method=dict(TINY["method"], rule="bogus")))
    with pytest.raises(ValueError, match="unknown extrapolation rule 'bogus'"):
        runner.unlearn(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_rerun_without_reference_keeps_the_recorded_tokenizer(tmp_path, monkeypatch):
    from jaxunlearn.data import synthetic_benchmark, synthetic_tokenizer

    cfg = from_dict(TINY)
    recorded = synthetic_tokenizer(synthetic_benchmark(seed=1, n_entities=5))
    own = synthetic_tokenizer(runner.load_benchmark(cfg.data))
    assert recorded.get_vocab() != own.get_vocab()
    recorded.save_pretrained(str(tmp_path / "tok"))
    run = tmp_path / "run"
    runner.check_or_write_config(runner.resolve_run(cfg, str(run))[0], run)
    ck.reference_path(run).mkdir(parents=True)
    ck.write_json(ck.reference_path(run) / ck.META_FILE, {"hash": "0", "tokenizer": str(tmp_path / "tok")})
    seen = []

    def reference_for(cfg, run, reference, tokenizer):
        seen.append(tokenizer)
        raise _Stop

    monkeypatch.setattr(runner, "reference_for", reference_for)
    with pytest.raises(_Stop):
        runner.unlearn(cfg, run)  # rerun with no --reference
    assert seen[0].get_vocab() == recorded.get_vocab()


def test_raw_texts_are_chunked_like_the_muse_evaluation():
    from jaxunlearn.data import encode_texts, synthetic_tokenizer

    cfg = from_dict(TINY)
    tok = synthetic_tokenizer(runner.load_benchmark(cfg.data))
    texts = [" ".join(["the author wrote a novel about the sea"] * 20), "Short."]
    assert runner.encode(tok, cfg, texts) == encode_texts(tok, texts, cfg.data.max_len)


def test_momentum_that_would_never_update_is_refused_before_training(tmp_path, monkeypatch):
    from jaxunlearn import train

    def train_loop(*args, **kwargs):
        raise _Stop("training started")

    monkeypatch.setattr(train, "train_loop", train_loop)
    cfg = from_dict(dict(TINY, method=dict(TINY["method"], momentum_every=TOTAL_STEPS + 1)))
    with pytest.raises(ValueError, match="momentum_every.*no momentum update"):
        runner.unlearn(cfg, tmp_path / "run")
    assert _steps(tmp_path / "run") == []


def test_run_config_written_before_the_method_section_still_reads(tmp_path):
    from jaxunlearn.config import to_dict
    from jaxunlearn.rundir import read_run_config

    legacy = to_dict(from_dict({}))
    legacy.pop("method")
    legacy.update(method="mox", mox={"objective": "mox", "alpha": 8.0, "momentum": True})
    ck.write_config(tmp_path / "mox", legacy)
    cfg = read_run_config(tmp_path / "mox")
    assert cfg.method.name == "mox" and cfg.method.params.alpha == 8.0 and cfg.method.params.momentum
    ck.write_config(tmp_path / "ft", dict(legacy, method="finetune"))
    assert read_run_config(tmp_path / "ft").method.name == "finetune"


def test_one_exit_path(tmp_path, capsys, monkeypatch):
    from jaxunlearn.config import ConfigError
    from jaxunlearn.errors import JaxunlearnError

    argv = ["unlearn", "method=npo", "method.eta=1", "--run", str(tmp_path / "r")]
    assert cli.main(argv) == cli.EXIT_ERROR == 1
    err = _last_err(capsys)
    assert len(err) == 1 and err[0].startswith("jaxunlearn unlearn: error: ") and "method.eta" in err[0], err
    assert cli.main(["nope"]) == cli.EXIT_USAGE == 2
    monkeypatch.setenv("JAXUNLEARN_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli.main(argv)
    # every expected error type derives from the one base
    from jaxunlearn import checkpoint, data, extrapolate, rundir, sharding, train
    from jaxunlearn.evals.tofu import EvalError
    from jaxunlearn.methods import UnknownMethodError
    from jaxunlearn.models.config import ModelConfigError
    from jaxunlearn.objectives import UnknownObjectiveError
    from jaxunlearn.objectives.common import MissingBatchKeyError

    for error in (ConfigError, checkpoint.CheckpointError, checkpoint.RunNotFoundError, data.DataError,
                  extrapolate.UnknownRuleError, rundir.RunConfigMismatchError, sharding.MeshError,
                  train.NonFiniteError, EvalError, UnknownMethodError, ModelConfigError, UnknownObjectiveError,
                  MissingBatchKeyError):
        assert issubclass(error, JaxunlearnError), error


def test_evaluation_depends_on_the_run_directory_never_on_training_code():
    import ast

    root = pathlib.Path(__file__).resolve().parents[1] / "jaxunlearn"
    training = {"jaxunlearn.runner", "jaxunlearn.stage", "jaxunlearn.train", "jaxunlearn.optim"}

    def imports(path):
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        return out

    for path in [*sorted((root / "evals").glob("*.py")), root / "rundir.py"]:
        assert not imports(path) & training, path
    assert "jaxunlearn.rundir" in imports(root / "evals" / "cli.py")
