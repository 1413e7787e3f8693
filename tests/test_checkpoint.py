"""Run-directory checkpoints: hashes, atomic writes, cross-mesh restores, memorised steps."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxunlearn import checkpoint as ck


def _mesh(n: int) -> Mesh:
    devs = np.array(jax.devices()[:n])
    shape = {8: (2, 4), 4: (2, 2), 1: (1, 1)}[n]
    return Mesh(devs.reshape(shape), ("data", "fsdp"))


SPECS = {"embed": P("fsdp", None), "layers": [{"w": P(None, "fsdp"), "b": P()}, {"w": P("data", "fsdp"), "b": P()}]}


def _params(seed: int = 0) -> dict:
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "embed": jax.random.normal(k[0], (16, 8)),
        "layers": [
            {"w": jax.random.normal(k[1], (8, 8)), "b": jnp.arange(8, dtype=jnp.float32)},
            {"w": jax.random.normal(k[2], (8, 8)).astype(jnp.bfloat16), "b": jnp.ones(8, jnp.bfloat16)},
        ],
    }


def _shardings(mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS, is_leaf=lambda x: isinstance(x, P))


def _sharded(params, mesh):
    return jax.device_put(params, _shardings(mesh))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _snapshot(root: pathlib.Path) -> dict:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_hash_is_sharding_and_container_independent():
    p = _params()
    h8 = ck.params_hash(_sharded(p, _mesh(8)))
    assert h8 == ck.params_hash(jax.device_get(p)) == ck.params_hash(_sharded(p, _mesh(4)))
    changed = jax.tree.map(lambda x: x, p)
    changed["layers"][0]["b"] = changed["layers"][0]["b"].at[3].add(1e-3)
    assert ck.params_hash(changed) != h8
    # dtype is part of the hash even when the values are equal
    cast = dict(p, embed=p["embed"].astype(jnp.bfloat16).astype(jnp.float32))
    assert ck.params_hash(dict(cast, embed=cast["embed"].astype(jnp.bfloat16))) != ck.params_hash(cast)


def test_reference_saved_on_8_restores_on_4_and_1(tmp_path):
    p8 = _sharded(_params(), _mesh(8))
    h = ck.save_reference(tmp_path, p8)
    assert ck.has_reference(tmp_path) and ck.reference_hash(tmp_path) == h
    for n in (4, 1):
        target = ck.abstract_tree(p8, _shardings(_mesh(n)))
        got, meta = ck.load_reference(tmp_path, target)
        _assert_same(got, p8)
        assert meta["hash"] == h
        for leaf, sh in zip(jax.tree.leaves(got), jax.tree.leaves(_shardings(_mesh(n)))):
            assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    assert ck.verify_reference(tmp_path, jax.device_get(p8)) == h


def test_reference_written_once(tmp_path):
    ck.save_reference(tmp_path, _params(0))
    with pytest.raises(ck.CheckpointExistsError, match="already exists"):
        ck.save_reference(tmp_path, _params(1))
    got, _ = ck.load_reference(tmp_path, ck.abstract_tree(_params(0)))
    _assert_same(got, _params(0))
    ck.save_reference(tmp_path, _params(1), overwrite=True)
    got, _ = ck.load_reference(tmp_path, ck.abstract_tree(_params(0)))
    _assert_same(got, _params(1))
    assert not list(tmp_path.glob(".tmp-*"))


def test_reference_hash_mismatch_is_clear_and_loses_nothing(tmp_path):
    ck.save_reference(tmp_path, _params(0))
    ref = ck.reference_path(tmp_path)
    # tamper: replace the stored arrays by other values of the same shapes
    shutil.rmtree(ref / ck.PARAMS_DIR)
    ckptr = __import__("orbax.checkpoint", fromlist=["x"]).StandardCheckpointer()
    ckptr.save(ref / ck.PARAMS_DIR, _params(1))
    ckptr.wait_until_finished()
    before = _snapshot(tmp_path)
    with pytest.raises(ck.HashMismatchError, match="content hash"):
        ck.load_reference(tmp_path, ck.abstract_tree(_params(0)))
    with pytest.raises(ck.HashMismatchError, match="differ from the run's reference"):
        ck.verify_reference(tmp_path, _params(1))
    assert _snapshot(tmp_path) == before and ck.has_reference(tmp_path)


def test_leftover_tmp_and_incomplete_folders_are_ignored(tmp_path):
    # a crash mid-write leaves only a hidden temp folder: no reference is reported
    (tmp_path / f"{ck.TMP_PREFIX}{ck.REFERENCE_DIR}-dead").mkdir(parents=True)
    (tmp_path / f"{ck.TMP_PREFIX}{ck.REFERENCE_DIR}-dead" / "junk").write_text("x")
    assert not ck.has_reference(tmp_path)
    # a reference folder without meta.json is not complete either
    (tmp_path / ck.REFERENCE_DIR / ck.PARAMS_DIR).mkdir(parents=True)
    assert not ck.has_reference(tmp_path)
    with pytest.raises(ck.RunNotFoundError, match="no complete reference"):
        ck.load_reference(tmp_path, ck.abstract_tree(_params()))
    # the next write replaces both and cleans the leftover
    ck.save_reference(tmp_path, _params())
    assert ck.has_reference(tmp_path) and not list(tmp_path.glob(".tmp-*"))


def test_forget_checkpoints(tmp_path):
    p8 = _sharded(_params(2), _mesh(8))
    ck.save_forget(tmp_path, p8, alpha=4, source_step=12)
    ck.save_forget(tmp_path, p8, alpha=0.5, source_step=12, eta=0.675)
    with pytest.raises(ck.CheckpointExistsError):
        ck.save_forget(tmp_path, p8, alpha=4.0, source_step=13)
    metas = {m["path"].split("/")[-1]: m for m in ck.list_forget(tmp_path)}
    assert set(metas) == {"alpha_4.0", "alpha_0.5_eta_0.675"}
    assert metas["alpha_4.0"]["source_step"] == 12 and metas["alpha_4.0"]["eta"] is None
    assert metas["alpha_0.5_eta_0.675"]["eta"] == 0.675
    got, meta = ck.load_forget(tmp_path, 0.5, ck.abstract_tree(p8, _shardings(_mesh(1))), eta=0.675)
    _assert_same(got, p8)
    assert meta["alpha"] == 0.5


def test_memorized_saved_on_8_restores_on_4_and_1(tmp_path):
    mesh8 = _mesh(8)
    params = _sharded(_params(3), mesh8)
    opt = optax.adamw(1e-3)
    opt_state = jax.jit(opt.init)(params)
    key = jax.random.key(7)
    with ck.MemorizedCheckpoints(tmp_path, max_to_keep=2) as mem:
        for step in (1, 2, 3):
            params = jax.tree.map(lambda x: x + 1, params)
            mem.save(step, params, opt_state, jax.random.fold_in(key, step), {"step": step, "epoch": step // 2})
    mem = ck.MemorizedCheckpoints(tmp_path, max_to_keep=2)
    assert mem.all_steps() == [2, 3] and mem.latest_step() == 3
    for n in (4, 1):
        sh = _shardings(_mesh(n))
        repl = NamedSharding(_mesh(n), P())
        opt_target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), opt_state
        )
        got = mem.restore(ck.abstract_tree(params, sh), opt_target)
        assert got["step"] == 3 and got["position"] == {"step": 3, "epoch": 1}
        _assert_same(got["params"], params)
        _assert_same(got["opt_state"], opt_state)
        np.testing.assert_array_equal(
            jax.random.key_data(got["rng"]), jax.random.key_data(jax.random.fold_in(key, 3))
        )
        assert jax.tree.leaves(got["params"])[0].sharding.is_equivalent_to(jax.tree.leaves(sh)[0], 2)
    older = mem.restore(ck.abstract_tree(params), step=2)
    assert older["opt_state"] is None and older["position"]["step"] == 2
    mem.close()


def test_memorized_step_records_and_checks_content_hashes(tmp_path):
    """Each step records sha256 of params, opt_state and rng; a restore that reads different
    values (here: the step's params overwritten in place by another tree) is refused."""
    params = _params(2)
    opt_state = {"count": jnp.zeros((), jnp.int32)}
    with ck.MemorizedCheckpoints(tmp_path) as mem:
        mem.save(1, params, opt_state, jax.random.key(0), {"step": 1})
        mem.save(2, jax.tree.map(lambda x: x + 1, params), opt_state, jax.random.key(0), {"step": 2})
    root = tmp_path / ck.MEMORIZED_DIR
    recorded = json.loads((root / "1" / "position" / "metadata").read_text())["hashes"]
    assert recorded["params"] == ck.params_hash(params) and set(recorded) == {"params", "opt_state", "rng"}
    shutil.rmtree(root / "1" / "params")
    shutil.copytree(root / "2" / "params", root / "1" / "params")  # valid Orbax data, wrong values
    with ck.MemorizedCheckpoints(tmp_path) as mem:
        assert mem.restore(ck.abstract_tree(params), step=2)["step"] == 2
        with pytest.raises(ck.HashMismatchError, match="1: memorised params do not match"):
            mem.restore(ck.abstract_tree(params), step=1)


def test_memorized_unfinished_step_is_ignored(tmp_path):
    params = _params(4)
    with ck.MemorizedCheckpoints(tmp_path) as mem:
        mem.save(5, params, {"count": jnp.zeros((), jnp.int32)}, jax.random.key(0), {"step": 5})
    # what a kill during the save of step 9 leaves behind: an unfinalised Orbax temp folder
    root = tmp_path / ck.MEMORIZED_DIR
    shutil.copytree(root / "5", root / "9.orbax-checkpoint-tmp-1234")
    mem = ck.MemorizedCheckpoints(tmp_path)
    assert mem.latest_step() == 5 and mem.all_steps() == [5]
    assert not (root / "9.orbax-checkpoint-tmp-1234").exists()
    got = mem.restore(ck.abstract_tree(params))
    assert got["step"] == 5
    with pytest.raises(ck.RunNotFoundError, match="step 9"):
        mem.restore(ck.abstract_tree(params), step=9)
    mem.close()


def test_missing_run_and_metrics(tmp_path):
    with pytest.raises(ck.RunNotFoundError, match="does not exist"):
        ck.require_run(tmp_path / "nope")
    with pytest.raises(ck.RunNotFoundError, match="no config"):
        ck.read_config(tmp_path)
    ck.write_config(tmp_path, {"a": 1, "b": {"c": [1, 2]}})
    assert ck.read_config(tmp_path) == {"a": 1, "b": {"c": [1, 2]}}
    ck.append_metrics(tmp_path, {"step": 1, "loss": jnp.float32(0.5)})
    ck.append_metrics(tmp_path, {"step": 2, "loss": np.float64(0.25)})
    assert [r["loss"] for r in ck.read_metrics(tmp_path)] == [0.5, 0.25]
    assert all(json.loads(l) for l in (tmp_path / ck.METRICS_FILE).read_text().splitlines())


def test_relative_run_directory(tmp_path, monkeypatch):
    """Run directories given relative to the working directory (as on the command line) work."""
    monkeypatch.chdir(tmp_path)
    p = _params()
    ck.save_reference("rel_run", p)
    ck.save_forget("rel_run", p, alpha=4.0, source_step=0)
    restored, _ = ck.load_reference("rel_run", ck.abstract_tree(p))
    _assert_same(restored, p)
    _assert_same(ck.load_forget("rel_run", 4.0, ck.abstract_tree(p))[0], p)


def test_corrupt_config_and_metrics_name_the_file(tmp_path):
    (tmp_path / ck.CONFIG_FILE).write_text("train: {lr: [\n")
    with pytest.raises(ck.CheckpointError, match=r"config\.yaml: not valid YAML"):
        ck.read_config(tmp_path)
    ck.append_metrics(tmp_path, {"step": 1})
    with open(tmp_path / ck.METRICS_FILE, "a") as f:
        f.write('{"step": 2, "lo\n')
    with pytest.raises(ck.CheckpointError, match=r"metrics\.jsonl:2: not valid JSON"):
        ck.read_metrics(tmp_path)
