"""The persistent compilation cache (jaxunlearn.compile_cache): where it goes, switched off, an unusable
folder, the CLI hook, and a second process that loads every program of a sharded, donating train step
and extrapolation from the cache instead of compiling it."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from jaxunlearn import cli, compile_cache

SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")


@pytest.fixture
def restore_jax_cache():
    """Put the session's cache settings (tests/conftest.py) back after a test that changes them."""
    saved = {name: getattr(jax.config, name) for name in SETTINGS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_folder_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "jaxunlearn" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "jaxunlearn" / "jax"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.chosen_dir() == tmp_path / "mine"
    for off in ("off", "OFF", "0", "false", "no"):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.chosen_dir() is None


def test_jax_setting_kept_without_our_variable(monkeypatch, tmp_path, restore_jax_cache):
    monkeypatch.delenv(compile_cache.ENV)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jaxs"))
    assert compile_cache.enable() == tmp_path / "jaxs"
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # small CPU programs are cached too
    assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES  # capped, hence locked


def test_off_switches_the_cache_off(monkeypatch, restore_jax_cache):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.enable() is None
    assert not jax.config.jax_enable_compilation_cache


def test_off_in_multi_process_cpu_runs(monkeypatch, tmp_path, capsys, restore_jax_cache):
    # several CPU processes joined by jax.distributed (gloo) ran mismatched collectives with cached programs
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert compile_cache.multiprocess_cpu()
    assert compile_cache.enable() is None
    assert "compilation cache off: several CPU processes" in capsys.readouterr().err
    assert not jax.config.jax_enable_compilation_cache
    monkeypatch.setattr(jax, "process_count", lambda: 1)  # one process joined alone keeps the cache
    assert not compile_cache.multiprocess_cpu()
    assert compile_cache.enable() == tmp_path / "cache"


def test_unusable_folder_warns_once_and_goes_on(monkeypatch, tmp_path, capsys, restore_jax_cache):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(compile_cache.ENV, str(blocker / "cache"))  # a folder inside a file cannot exist
    assert compile_cache.enable() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compilation cache off" in err[0] and str(blocker / "cache") in err[0]
    assert not jax.config.jax_enable_compilation_cache
    assert float(jax.jit(lambda x: x * 3.0)(np.float32(2.0))) == 6.0


def test_damaged_entry_is_compiled_again(monkeypatch, tmp_path, restore_jax_cache):
    # e.g. a process killed while writing it: JAX warns and compiles; the command goes on
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    compile_cache.enable()
    f = jax.jit(lambda x: x * 5.0 + 1.0)
    assert float(f(np.float32(2.0))) == 11.0
    entries = list((tmp_path / "cache").glob("*-cache"))
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:20])
    jax.clear_caches()
    with pytest.warns(UserWarning, match="persistent compilation cache"):
        assert float(jax.jit(lambda x: x * 5.0 + 1.0)(np.float32(2.0))) == 11.0


def test_cli_enables_the_cache_for_every_command_but_plan(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(compile_cache, "enable", lambda: calls.append(1))
    # a command that fails on its input after the hook ran: exit 1, one line
    assert cli.main(["data", str(tmp_path / "missing.yaml")]) == cli.EXIT_ERROR
    assert calls == [1]
    with pytest.raises(SystemExit):
        cli.main(["plan", "--no-such-option"])
    assert calls == [1]
    capsys.readouterr()


# One tiny train step (MOX objective, AdamW, params and optimiser state donated, FSDP x tensor x data
# shardings on the 8 simulated devices) and one donating extrapolation, in a fresh process.
PROGRAMS = r"""
import json, sys
import jax, numpy as np
from flax import nnx
from jax import monitoring
from jaxunlearn import compile_cache
from jaxunlearn.extrapolate import extrapolate
from jaxunlearn.models import ModelConfig, init_model, make_apply, param_logical_axes, split_params
from jaxunlearn.objectives import get_objective
from jaxunlearn.optim import make_optimizer
from jaxunlearn.sharding import make_mesh, param_shardings
from jaxunlearn.train import copy_tree, init_opt_state, make_train_step

events = {}
monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
folder = compile_cache.enable()
cfg = ModelConfig.preset("tiny-llama", vocab_size=32, num_layers=1, hidden_size=32, intermediate_size=64,
                         num_heads=2, num_kv_heads=2, head_dim=16)
graphdef, abstract = split_params(nnx.eval_shape(lambda: init_model(cfg)))
mesh = make_mesh(data=2, fsdp=2, tensor=2)
shardings = param_shardings(param_logical_axes(abstract), mesh, abstract)
rng = np.random.default_rng(0)
params = jax.device_put(jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), abstract), shardings)
ref = copy_tree(params)
optimizer, schedule = make_optimizer(1e-3, total_steps=4, warmup_steps=1)
opt_state, _ = init_opt_state(optimizer, params, shardings, mesh)
step = make_train_step(get_objective("mox"), make_apply(graphdef), optimizer, mesh, shardings, params=params,
                       schedule=schedule)
ids = rng.integers(3, 32, (8, 16)).astype(np.int32)
part = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
params, opt_state, metrics = step(params, opt_state, {"forget": part, "retain": part}, ref)
forget = extrapolate(ref, params, 4.0)
print(json.dumps({"folder": str(folder), "loss": float(metrics["loss"]),
                  "sum": float(sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(forget))),
                  "hits": events.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": events.get("/jax/compilation_cache/cache_misses", 0)}))
"""


def test_second_process_compiles_nothing(tmp_path):
    env = dict(os.environ, **{compile_cache.ENV: str(tmp_path / "cache")})

    def run():
        done = subprocess.run([sys.executable, "-c", PROGRAMS], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["folder"] == str(tmp_path / "cache")
    assert first["misses"] > 0 and first["hits"] == 0
    # the second process finds every program under the same key: same HLO, shardings, donation, flags
    assert second["misses"] == 0 and second["hits"] == first["misses"]
    assert len(list((tmp_path / "cache").glob("*-cache"))) == first["misses"]
    assert (second["loss"], second["sum"]) == (first["loss"], first["sum"])  # same results from loaded programs
