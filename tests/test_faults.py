"""Faults a researcher or a preemptible machine meets (issue 11): each ends with a non-zero exit,
one line on stderr naming what is wrong and what to do, and the files already on disk unchanged.

One tiny MOX run (12 steps on 8 simulated devices, a checkpoint every 2) is trained once per module
and copied per test. Most faults call the CLI in-process (`jaxunlearn.cli.main`); signals, locks
held by another process, a read-only mount and a full disk use CLI subprocesses, which share a
persistent compilation cache with the in-process run so they do not compile again.
"""

import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import yaml

from jaxunlearn import checkpoint as ck
from jaxunlearn import cli, runner
from jaxunlearn.lock import LOCK_FILE, RunLock, RunLockedError

TINY = {
    "data": {"synthetic_entities": 6, "max_len": 64, "buckets": [64]},
    "train": {"batch_size": 8, "epochs": 3, "lr": 1e-3},
    "method": {"name": "mox", "alpha": 4.0},
    "checkpoint": {"save_every": 2, "keep": 2},
}
TOTAL_STEPS = 12
FINETUNE_DIR = "finetune"  # the finetune method's checkpoint folder
REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    # the in-process run fills the cache that the CLI subprocesses then read
    jax.config.update("jax_compilation_cache_dir", str(root / "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return root


@pytest.fixture(scope="module")
def clean(work):
    """A finished tiny run (reference, memorised steps 10 and 12, forget model alpha 4)."""
    run = work / "clean"
    runner.unlearn(runner.load_config(str(work / "tiny.yaml")), run, reference="random")
    return run


@pytest.fixture
def run(clean, tmp_path):
    """A private copy of the finished run."""
    dest = tmp_path / "run"
    shutil.copytree(clean, dest)
    return dest


def _env(work):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(work / "xla-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAXUNLEARN_PROGRESS_SECONDS="0")
    env.pop("JAXUNLEARN_DEBUG", None)
    return env


def _cmd(*args):
    return [sys.executable, "-m", "jaxunlearn.cli", *map(str, args)]


def snapshot(root: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under root (the lock file, rewritten by every writer, excepted)."""
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != LOCK_FILE}


def call(capsys, *argv) -> tuple[int, str, list[str]]:
    """jaxunlearn CLI in-process: (exit status, stdout, non-empty stderr lines)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, [line for line in out.err.splitlines() if line.strip()]


def one_line(err: list[str], *needles: str) -> str:
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def steps(run: pathlib.Path, subdir: str = ck.MEMORIZED_DIR) -> list[int]:
    d = run / subdir
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def params(run, which, **kw):
    return jax.device_get(runner.load_run_params(run, which, **kw)[1])


def assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def logged_steps(run, stage="mox") -> list[int]:
    return [r["step"] for r in ck.read_metrics(run) if r.get("stage") == stage and "event" not in r]


def reference_only(run: pathlib.Path) -> pathlib.Path:
    """Turn a run copy into one that has its reference and config but has not trained yet."""
    for name in (ck.MEMORIZED_DIR, ck.FORGET_DIR, ck.METRICS_FILE):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return run


def flip_byte(path: pathlib.Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def as_finetune_run(run: pathlib.Path, split: str = "full") -> pathlib.Path:
    """Relabel a run copy as a finished `finetune --split SPLIT` run (config method, reference meta)."""
    cfg = yaml.safe_load((run / ck.CONFIG_FILE).read_text())
    (run / ck.CONFIG_FILE).write_text(yaml.safe_dump(dict(cfg, method={"name": "finetune"}), sort_keys=False))
    meta = ck.read_meta(ck.reference_path(run))
    meta["source"] = dict(meta["source"], finetuned_on=split)
    ck.write_json(ck.reference_path(run) / ck.META_FILE, meta)
    return run


# ----------------------------------------------------------------------------- alpha


@pytest.mark.parametrize("alpha", ["nan", "inf", "0", "-2"])
def test_extrapolate_rejects_alpha_that_is_not_finite_and_positive(run, capsys, alpha):
    before = snapshot(run)
    rc, _, err = call(capsys, "extrapolate", "--run", run, "--alpha", alpha)
    assert rc == 1
    one_line(err, "--alpha", "finite number > 0")
    assert snapshot(run) == before


def test_extrapolate_checks_every_alpha_before_writing_any(run, capsys):
    before = snapshot(run)
    rc, _, err = call(capsys, "extrapolate", "--run", run, "--alpha", "2", "nan")
    assert rc == 1
    one_line(err, "--alpha nan")
    assert snapshot(run) == before and not ck.forget_path(run, 2.0).exists()


@pytest.mark.parametrize("override", ["method.alpha=nan", "method.alpha=.inf", "method.alphas=[1, .nan]",
                                      "method.alphas=[2, 0]"])
def test_config_rejects_alpha_that_is_not_finite_and_positive(tmp_path, capsys, override):
    rc, _, err = call(capsys, "unlearn", override, "--run", tmp_path / "new", "--reference", "random")
    assert rc == 1
    one_line(err, "method.alpha", "finite number > 0")
    assert not (tmp_path / "new").exists()


def test_extrapolation_functions_reject_bad_alpha():
    from jaxunlearn import extrapolate as ex
    from jaxunlearn.config import ConfigError

    tree = {"w": jax.numpy.ones(3)}
    for bad in (float("nan"), float("inf"), 0.0, -2.0):
        with pytest.raises(ConfigError, match="finite number > 0"):
            ex.extrapolate(tree, tree, bad, donate=False)
        with pytest.raises(ConfigError, match="finite number > 0"):
            ex.momentum_update(None, tree, tree, bad, 0.5)
        with pytest.raises(ConfigError, match="finite number > 0"):
            list(ex.alpha_sweep(tree, tree, [1.0, bad]))


# ----------------------------------------------------------------------------- checkpoints verified on read


def test_flipped_byte_in_memorized_step_is_detected(run, capsys):
    step_dir = run / ck.MEMORIZED_DIR / str(TOTAL_STEPS) / "params"
    flip_byte(largest_file(step_dir))
    before = snapshot(run)
    rc, _, err = call(capsys, "extrapolate", "--run", run, "--alpha", "2")
    assert rc == 1
    one_line(err, f"{ck.MEMORIZED_DIR}/{TOTAL_STEPS}")
    assert snapshot(run) == before and not ck.forget_path(run, 2.0).exists()


def test_memorized_step_hash_mismatch_names_the_step(run):
    """A value changed in place (no format damage) is caught by the recorded hash."""
    import orbax.checkpoint as ocp

    position_file = run / ck.MEMORIZED_DIR / str(TOTAL_STEPS) / "position" / "metadata"
    position = json.loads(position_file.read_text())
    position["hashes"]["params"] = "0" * 64  # what a changed parameter would look like
    position_file.write_text(json.dumps(position))
    with pytest.raises(ck.HashMismatchError, match=f"{TOTAL_STEPS}: memorised params do not match"):
        runner.extrapolate_run(run, [2.0])
    assert ocp  # orbax imported: the restore itself worked, only the hash disagreed


def test_memorized_step_without_recorded_hash_is_refused(run):
    position_file = run / ck.MEMORIZED_DIR / str(TOTAL_STEPS) / "position" / "metadata"
    position = json.loads(position_file.read_text())
    del position["hashes"]
    position_file.write_text(json.dumps(position))
    with pytest.raises(ck.HashMismatchError, match="no recorded content hash"):
        runner.extrapolate_run(run, [2.0])


def test_damaged_optimizer_state_stops_a_resume(run, capsys):
    """Resuming reads params, optimiser state and RNG: all three are verified."""
    shutil.rmtree(run / ck.FORGET_DIR)
    position_file = run / ck.MEMORIZED_DIR / str(TOTAL_STEPS) / "position" / "metadata"
    position = json.loads(position_file.read_text())
    position["hashes"]["opt_state"] = "f" * 64
    position_file.write_text(json.dumps(position))
    before = snapshot(run)
    rc, _, err = call(capsys, "unlearn", run / ck.CONFIG_FILE, "--run", run)
    assert rc == 1
    one_line(err, "memorised opt_state do not match")
    assert snapshot(run) == before


def test_flipped_byte_in_forget_model_is_detected_on_export(run, tmp_path, capsys):
    flip_byte(largest_file(ck.forget_path(run, 4.0) / ck.PARAMS_DIR))
    rc, _, err = call(capsys, "export-hf", "--run", run, "--which", "forget", "--out", tmp_path / "hf")
    assert rc == 1
    one_line(err, "forget")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_flipped_byte_in_reference_is_detected(run, capsys):
    flip_byte(largest_file(ck.reference_path(run) / ck.PARAMS_DIR))
    before = snapshot(run)
    rc, _, err = call(capsys, "extrapolate", "--run", run, "--alpha", "2")
    assert rc == 1
    one_line(err, "reference")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- reference and run kind


def test_unlearn_without_reference_is_refused(tmp_path, capsys):
    rc, _, err = call(capsys, "unlearn", "--run", tmp_path / "new")
    assert rc == 1
    one_line(err, "--reference", "--reference random")
    assert not (tmp_path / "new" / ck.CONFIG_FILE).exists()


def test_extrapolate_on_a_finetune_run_says_so(run, capsys):
    as_finetune_run(run)
    before = snapshot(run)
    rc, _, err = call(capsys, "extrapolate", "--run", run, "--alpha", "2")
    assert rc == 1
    one_line(err, "is a finetune run", "jaxunlearn unlearn --reference")
    assert snapshot(run) == before


def test_finetune_on_another_split_into_a_finished_run_is_refused(run, capsys):
    as_finetune_run(run, "full")
    before = snapshot(run)
    rc, out, err = call(capsys, "finetune", run / ck.CONFIG_FILE, "method=finetune", "--run", run, "--split", "retain")
    assert rc == 1 and "reference written" not in out
    one_line(err, "trained on split full, not retain", "--overwrite")
    assert snapshot(run) == before


def test_finetune_resumed_on_another_split_is_refused(run, capsys):
    """A finetune run interrupted on split full (checkpoints, no reference yet), rerun with --split retain."""
    as_finetune_run(run, "full")
    shutil.rmtree(ck.reference_path(run))
    shutil.rmtree(run / ck.FORGET_DIR)
    (run / ck.MEMORIZED_DIR).rename(run / FINETUNE_DIR)
    for step in steps(run, FINETUNE_DIR):
        position_file = run / FINETUNE_DIR / str(step) / "position" / "metadata"
        position = json.loads(position_file.read_text())
        position_file.write_text(json.dumps(dict(position, reference_hash=None, data="split full")))
    before = snapshot(run)
    rc, _, err = call(capsys, "finetune", run / ck.CONFIG_FILE, "--run", run, "--split", "retain")
    assert rc == 1
    one_line(err, "trained on split full, this command asks for split retain", "--overwrite")
    assert snapshot(run) == before


def test_synthetic_benchmark_rejects_unknown_forget_split(tmp_path, capsys):
    rc, _, err = call(capsys, "unlearn", "data.forget_split=forget99", "--run", tmp_path / "new", "--reference", "random")
    assert rc == 1
    one_line(err, "forget99", "forget01, forget05, forget10")
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- config and lengths


def test_yaml_duplicate_key_is_rejected_with_its_line(tmp_path, capsys):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("train:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 5.0e-3\n")
    rc, _, err = call(capsys, "unlearn", cfg, "--run", tmp_path / "new", "--reference", "random")
    assert rc == 1
    one_line(err, f"{cfg}:4", "'lr' appears twice")
    assert not (tmp_path / "new").exists()


def test_run_config_with_duplicate_key_is_rejected(run):
    (run / ck.CONFIG_FILE).write_text((run / ck.CONFIG_FILE).read_text() + "method: mox\n")
    with pytest.raises(ck.CheckpointError, match="'method' appears twice"):
        ck.read_config(run)


def test_max_len_that_cuts_every_answer_is_refused(tmp_path, capsys):
    new = tmp_path / "new"
    rc, _, err = call(capsys, "unlearn", "data.max_len=8", "data.buckets=[8]", "--run", new, "--reference", "random")
    assert rc == 1
    line = one_line(err, "data.max_len=8", "answers would be cut entirely", "at least")
    assert steps(new) == [] and not (new / ck.METRICS_FILE).exists()
    assert int(line.split("at least ")[1].split()[0]) > 8


def test_max_len_beyond_model_positions_is_refused(tmp_path, capsys):
    new = tmp_path / "new"
    rc, _, err = call(capsys, "unlearn", "data.max_len=100000", "data.buckets=[100000]", "--run", new,
                      "--reference", "random")
    assert rc == 1
    one_line(err, "data.max_len=100000", "max_position_embeddings")
    assert steps(new) == []


def test_overrides_after_run_are_accepted(run, capsys):
    before = snapshot(run / ck.FORGET_DIR)
    rc, _, err = call(capsys, "unlearn", run / ck.CONFIG_FILE, "--run", run, "checkpoint.keep=5")
    assert rc == 0, err
    assert snapshot(run / ck.FORGET_DIR) == before


def test_failed_first_run_reruns_with_fixed_setting_and_overwrite(clean, tmp_path, capsys):
    new = tmp_path / "new"
    bad = ["data.synthetic_entities=6", "data.max_len=64", "data.buckets=[64]", "train.batch_size=8",
           "train.epochs=3", "train.lr=1e-3", "checkpoint.save_every=2", "checkpoint.keep=2"]
    rc, _, err = call(capsys, "unlearn", *bad, "method.momentum=true", "method.momentum_every=99", "--run", new,
                      "--reference", "random")
    assert rc == 1 and "momentum_every" in one_line(err)
    rc, _, err = call(capsys, "unlearn", *bad, "--run", new, "--reference", "random")
    assert rc == 1
    one_line(err, "differs at method.momentum", "--overwrite")
    rc, _, err = call(capsys, "unlearn", *bad, "--run", new, "--reference", "random", "--overwrite")
    assert rc == 0, err
    assert steps(new)[-1] == TOTAL_STEPS
    assert_bitwise(params(new, "forget"), params(clean, "forget"))


# ----------------------------------------------------------------------------- lock


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from jaxunlearn.lock import RunLock
    lock = RunLock(sys.argv[1], "holder").acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _holder(work, path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], env=_env(work), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_fails_at_once_naming_the_holder(run, work, capsys):
    holder = _holder(work, run)
    try:
        before = snapshot(run)
        t0 = time.monotonic()
        rc, _, err = call(capsys, "unlearn", run / ck.CONFIG_FILE, "--run", run)
        assert rc == 1 and time.monotonic() - t0 < 30
        one_line(err, f"in use by pid {holder.pid}", "host")
        rc, _, err = call(capsys, "extrapolate", "--run", run, "--alpha", "2")
        assert rc == 1
        one_line(err, f"pid {holder.pid}")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over(run, work):
    holder = _holder(work, run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the dead holder
    assert runner.extrapolate_run(run, [2.0])
    assert ck.forget_path(run, 2.0).exists()


def test_stale_lock_record_without_flock_is_recovered(run, monkeypatch):
    """Where flock is unsupported, a recorded holder that is dead (same host) is taken over."""
    import fcntl
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (run / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}))

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with RunLock(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": 0}))
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()}"):
        RunLock(run).acquire()


def test_lock_is_released_after_a_failed_command(run, capsys):
    rc, _, _ = call(capsys, "extrapolate", "--run", run, "--alpha", "nan")
    assert rc == 1
    rc, _, err = call(capsys, "unlearn", run / ck.CONFIG_FILE, "train.lr=0.5", "--run", run)  # fails under the lock
    assert rc == 1
    one_line(err, "differs at train.lr")
    with RunLock(run):  # nobody holds it
        pass


# ----------------------------------------------------------------------------- write failures


def test_full_disk_during_unlearn_keeps_what_is_there(run, monkeypatch, capsys):
    """The checkpoint write of step 4 raises ENOSPC: one line; reference and step 2 stay intact."""
    import orbax.checkpoint as ocp

    reference_only(run)
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    before = snapshot(run / ck.REFERENCE_DIR)
    rc, _, err = call(capsys, "unlearn", run / ck.CONFIG_FILE, "--run", run)
    assert rc == 1
    one_line(err, "no space left on device", "last complete step: 2")
    assert snapshot(run / ck.REFERENCE_DIR) == before
    assert steps(run) == [2] and not (run / ck.FORGET_DIR).exists()
    params(run, "memorized")  # the kept step still verifies


def test_full_disk_while_writing_forget_model_leaves_nothing_that_looks_complete(run, monkeypatch, capsys):
    real = ck.write_json

    def write_json(path, obj):
        if pathlib.Path(path).name == ck.META_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(ck, "write_json", write_json)
    before = snapshot(run)
    rc, _, err = call(capsys, "extrapolate", "--run", run, "--alpha", "2")
    assert rc == 1
    one_line(err, "no space left on device")
    assert snapshot(run) == before
    assert not list((run / ck.FORGET_DIR).glob(f"{ck.TMP_PREFIX}*")) and not ck.forget_path(run, 2.0).exists()


def test_full_disk_while_logging_metrics_leaves_no_partial_line(run, monkeypatch):
    before = (run / ck.METRICS_FILE).read_bytes()
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def tell(self):
            return self.f.tell()

        def write(self, text):
            self.f.write(text[:5])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.f.flush()

        def truncate(self, n):
            self.f.truncate(n)

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if str(path).endswith(ck.METRICS_FILE) and "a" in mode else f

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(ck.CheckpointWriteError, match="no space left on device"):
        ck.append_metrics(run, {"stage": "memorize", "step": 99})
    monkeypatch.undo()
    assert (run / ck.METRICS_FILE).read_bytes() == before


def test_read_only_lock_location_is_one_line(run, monkeypatch):
    real_open = os.open

    def ro_open(path, flags, *args):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(ck.CheckpointWriteError, match="read-only file system"):
        RunLock(run).acquire()


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def _read_only(path: pathlib.Path, cmd: list[str]) -> list[str]:
    """cmd run with `path` read-only: a read-only bind mount (as root), else permissions."""
    if os.geteuid() == 0:
        if not _can_mount():
            pytest.skip("running as root without mount namespaces: cannot make a read-only directory")
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        return ["unshare", "-m", "sh", "-c", script, str(path), *cmd]
    subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
    return cmd


@pytest.mark.parametrize("where", ["run", "forget"])
def test_read_only_directory_during_extrapolate_is_one_line_without_hang(run, work, where):
    target = run if where == "run" else run / ck.FORGET_DIR
    before = snapshot(run)
    t0 = time.monotonic()
    done = subprocess.run(_read_only(target, _cmd("extrapolate", "--run", run, "--alpha", "2")), env=_env(work),
                          capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - t0
    subprocess.run(["chmod", "-R", "u+w", str(run)], check=True)
    assert done.returncode == 1, done.stderr[-3000:]
    one_line(done.stderr.splitlines(), "read-only file system")
    assert elapsed < 120, f"took {elapsed:.0f} s"  # Orbax's failed background save used to wait 300 s
    assert snapshot(run) == before


def test_really_full_disk_during_unlearn(run, work, tmp_path):
    """A tmpfs just big enough for the reference: TensorStore's RESOURCE_EXHAUSTED becomes one line."""
    if not _can_mount():
        pytest.skip("needs root and mount namespaces to mount a small tmpfs")
    reference_only(run)
    before = snapshot(run)
    size_kb = sum(f.stat().st_size for f in run.rglob("*") if f.is_file()) // 1024 + 600
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = 'mount -t tmpfs -o size="$1"k tmpfs "$0" && cp -r "$2" "$0"/run && shift 3 && "$@"; rc=$?; ' \
             'cp -r "$0"/run "$0"/../after; exit $rc'
    cmd = ["unshare", "-m", "sh", "-c", script, str(mnt), str(size_kb), str(run), "x",
           *_cmd("unlearn", run / ck.CONFIG_FILE, "--run", mnt / "run")]
    done = subprocess.run(cmd, env=_env(work), capture_output=True, text=True, timeout=400)
    assert done.returncode == 1, done.stderr[-3000:]
    one_line(done.stderr.splitlines(), "no space left on device")
    after = tmp_path / "after"
    assert {k: v for k, v in snapshot(after).items() if k in before} == before
    assert steps(after) == [] and not (after / ck.FORGET_DIR).exists()  # no half-written step looks complete


# ----------------------------------------------------------------------------- preemption


def test_sigterm_during_a_checkpoint_save_then_bitwise_equal_resume(run, clean, monkeypatch, capsys):
    reference_only(run)
    real_save = ck.MemorizedCheckpoints.save

    def save(self, step, *args, **kwargs):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step-6 checkpoint is being written
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ck.MemorizedCheckpoints, "save", save)
    rc, _, err = call(capsys, "unlearn", run / ck.CONFIG_FILE, "--run", run)
    assert rc == 143
    one_line(err, "interrupted at step 6; rerun the same command to resume")
    assert steps(run)[-1] == 6 and not (run / ck.FORGET_DIR).exists()
    monkeypatch.undo()
    rc, _, err = call(capsys, "unlearn", run / ck.CONFIG_FILE, "--run", run)
    assert rc == 0, err
    assert_bitwise(params(run, "memorized"), params(clean, "memorized"))
    assert_bitwise(params(run, "forget"), params(clean, "forget"))
    assert logged_steps(run) == list(range(1, TOTAL_STEPS + 1))


def test_sigint_between_checkpoints_writes_one_and_exits_130(run, clean, monkeypatch, capsys):
    from jaxunlearn import train

    reference_only(run)
    real_loop = train._loop

    def loop(step_fn, state, ref, batches, n, on_step, put_batch, stop):
        def on(st, metrics):
            out = on_step(st, metrics)
            if st.step == 5:  # between the checkpoints of steps 4 and 6
                os.kill(os.getpid(), signal.SIGINT)
            return out

        return real_loop(step_fn, state, ref, batches, n, on, put_batch, stop)

    monkeypatch.setattr(train, "_loop", loop)
    rc, _, err = call(capsys, "unlearn", run / ck.CONFIG_FILE, "--run", run)
    assert rc == 130
    one_line(err, "interrupted at step 5; rerun the same command to resume")
    assert steps(run)[-1] == 5
    monkeypatch.undo()
    assert call(capsys, "unlearn", run / ck.CONFIG_FILE, "--run", run)[0] == 0
    assert_bitwise(params(run, "forget"), params(clean, "forget"))
    assert logged_steps(run) == list(range(1, TOTAL_STEPS + 1))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_a_training_process_checkpoints_and_resumes_bitwise(run, clean, work, sig, code):
    reference_only(run)
    proc = subprocess.Popen(_cmd("unlearn", run / ck.CONFIG_FILE, "--run", run), env=_env(work),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not steps(run) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the run finished before the signal arrived")
    assert proc.returncode == code, err[-3000:]
    at = int(one_line(err.splitlines(), "rerun the same command to resume").split("at step ")[1].split(";")[0])
    assert steps(run)[-1] == at < TOTAL_STEPS
    done = subprocess.run(_cmd("unlearn", run / ck.CONFIG_FILE, "--run", run), env=_env(work),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_bitwise(params(run, "memorized"), params(clean, "memorized"))
    assert_bitwise(params(run, "forget"), params(clean, "forget"))
    assert logged_steps(run) == list(range(1, TOTAL_STEPS + 1))


def test_resume_after_a_kill_logs_each_step_once(run):
    """Steps logged after the last checkpoint (then SIGKILL) are dropped when the run resumes there."""
    records = ck.read_metrics(run)
    ck.truncate_metrics(run, "mox", 0)
    assert logged_steps(run) == []
    (run / ck.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    ck.truncate_metrics(run, "mox", 10)
    assert logged_steps(run) == list(range(1, 11))
    assert [r for r in ck.read_metrics(run) if "event" in r] == [r for r in records if "event" in r]


def test_interrupt_outside_the_loop_is_one_line(capsys, monkeypatch):
    from jaxunlearn import runner as r

    def slow(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(r, "extrapolate_run", slow)
    rc, _, err = call(capsys, "extrapolate", "--run", "x", "--alpha", "2")
    assert rc == 143
    one_line(err, "interrupted", "rerun the same command to resume")


# ----------------------------------------------------------------------------- export and evaluation


def test_export_files_are_world_readable(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert call(capsys, "export-hf", "--run", run, "--out", out)[0] == 0
    for name in ("model.safetensors", "config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_export_into_unrelated_folder_is_refused(run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    (out / "notes.txt").write_text("keep me\n")
    before = snapshot(out)
    rc, _, err = call(capsys, "export-hf", "--run", run, "--out", out)
    assert rc == 1
    one_line(err, "not empty", "new or empty folder")
    assert snapshot(out) == before


def test_export_over_an_earlier_export_is_allowed(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert call(capsys, "export-hf", "--run", run, "--out", out)[0] == 0
    assert call(capsys, "export-hf", "--run", run, "--which", "reference", "--out", out)[0] == 0
    assert json.loads((out / "jaxunlearn_export.json").read_text())["which"] == "reference"


def test_exported_folder_is_evaluated_on_the_recorded_benchmark(run, tmp_path, capsys):
    from jaxunlearn.evals import cli as eval_cli

    out = tmp_path / "hf"
    assert call(capsys, "export-hf", "--run", run, "--out", out)[0] == 0
    args = eval_cli._parser().parse_args([str(out), "--out", str(tmp_path / "ev")])
    spec = eval_cli.data_spec(args, eval_cli._export_data_spec(args, out))
    assert (spec.benchmark, spec.synthetic_entities, spec.synthetic_seed) == ("synthetic", 6, 0)
    assert capsys.readouterr().err == ""
    args = eval_cli._parser().parse_args([str(out), "--synthetic-entities", "40", "--out", str(tmp_path / "ev")])
    eval_cli._export_data_spec(args, out)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    one_line(err, "--synthetic-entities 40 differs from the 6")


# ----------------------------------------------------------------------------- progress


def test_progress_outside_a_terminal_logs_at_an_interval():
    import io

    from jaxunlearn.progress import Progress

    now = [0.0]
    out = io.StringIO()
    bar = Progress(total=10, initial=0, desc="memorize", stream=out, every=30.0, clock=lambda: now[0], terminal=False)
    for step in range(1, 11):
        now[0] += 10.0
        bar.update(step, loss=1.0 / step)
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["1/10", "4/10", "7/10", "10/10"]
    assert lines[1] == "memorize: step 4/10 (40%) loss 0.2500, 0.10 steps/s"


def test_progress_bar_in_a_terminal_stays():
    from jaxunlearn.progress import Progress

    bar = Progress(total=3, initial=0, desc="memorize", terminal=True)
    assert bar.bar is not None and bar.bar.leave is True
    bar.close()
