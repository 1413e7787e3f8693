"""Run directories and Orbax checkpoints for reference, memorised and forget parameters.

Layout of a run directory RUN:
  RUN/config.yaml             resolved configuration of the run
  RUN/reference/params/       Orbax checkpoint of the reference parameters (written once)
  RUN/reference/meta.json     content hash of those parameters; written last, so its
                              presence marks the reference as complete
  RUN/memorized/<step>/       Orbax CheckpointManager steps: items "params", "opt_state",
                              "rng" (key data) and "position" (JSON: step, epoch, ..., and
                              "hashes": content hashes of params, opt_state and rng)
  RUN/forget/<name>/          forget parameters, one folder per alpha (and eta), with
                              meta.json holding alpha, eta, source step and content hash
  RUN/metrics.jsonl           one JSON object per line, appended

Writes of the reference and forget folders go to a hidden temporary folder that is renamed
into place only once complete; a leftover temporary folder (after a crash) is ignored and
removed by the next write. The memorised steps rely on Orbax's own temporary-folder +
finalise protocol, and a step is listed only once finalised.

Every read is verified against the recorded content hash (reference, forget, and each item of a
memorised step), so a damaged checkpoint stops with HashMismatchError / CheckpointError instead of
flowing into later models. A write that fails (disk full, read-only, permissions) raises one
`errors.WriteError` line; the error logs of Orbax's background threads are silenced (they repeat
that one failure per array shard) unless JAXUNLEARN_DEBUG is set, and reference/forget folders are
written with a synchronous checkpointer so a failure cannot leave a background thread waiting.

Parameters are any pytree of jax arrays (e.g. an `nnx.State` of `nnx.Param`). Restores take an
abstract target (`abstract_tree`) whose leaves carry the shardings wanted now, so a checkpoint
written on one mesh restores onto another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
import uuid
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml

from jaxunlearn.config import read_yaml
from jaxunlearn.distributed import barrier, is_primary
from jaxunlearn.errors import JaxunlearnError, WriteError, is_write_failure, write_error
from jaxunlearn.models import layout as _layers

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
REFERENCE_DIR = "reference"
MEMORIZED_DIR = "memorized"
FORGET_DIR = "forget"
META_FILE = "meta.json"
PARAMS_DIR = "params"
TMP_PREFIX = ".tmp-"


class CheckpointError(JaxunlearnError, ValueError):
    """A checkpoint or run directory is unusable (bad content, wrong layout)."""


class HashMismatchError(CheckpointError):
    """Parameters do not match the content hash recorded beside them."""


class CheckpointExistsError(CheckpointError):
    """Refused to overwrite an existing reference or forget checkpoint."""


class RunNotFoundError(JaxunlearnError, FileNotFoundError):
    """A run directory, or a checkpoint inside it, does not exist."""


CheckpointWriteError = WriteError  # writing into the run directory failed (see errors.write_error)


class _QuietOrbax(logging.Filter):
    """Drops the error logs of Orbax's background threads and asyncio tasks (one traceback per array
    shard on a full disk): the failure itself is raised to the caller as one WriteError or
    CheckpointError. JAXUNLEARN_DEBUG=1 keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or os.environ.get("JAXUNLEARN_DEBUG"):
            return True
        if "orbax" in record.pathname:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        tb = exc.__traceback__ if exc is not None else None
        while tb is not None:  # an asyncio task of Orbax's that failed
            if "orbax" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return "orbax" not in record.getMessage()


_QUIET = _QuietOrbax()


def _late_callback_error(exc_type, exc, tb) -> bool:
    """TensorStore completing a write after Orbax closed its event loop (after a failed save):
    'Event loop is closed' raised in asyncio's call_soon_threadsafe, reported as unraisable."""
    if exc_type is not RuntimeError or "Event loop is closed" not in str(exc):
        return False
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def _quiet_orbax_errors() -> None:
    import sys

    for name in ("absl", "asyncio", ""):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    if not os.environ.get("JAXUNLEARN_DEBUG"):  # a write abandoned by a failed save leaves its coroutine unawaited
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    if getattr(sys.unraisablehook, "_jaxunlearn_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if os.environ.get("JAXUNLEARN_DEBUG") or not _late_callback_error(
            unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback
        ):
            previous(unraisable)

    hook._jaxunlearn_quiet = True
    sys.unraisablehook = hook


# ----------------------------------------------------------------------------- hashing


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def canonical_path(path: tuple) -> str:
    """'a/b/0/kernel' for a pytree key path; a trailing Variable '.value' is dropped."""
    names = [_key_name(e) for e in path]
    if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return "/".join(names)


def _host_array(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def host_tree(tree: Any) -> Any:
    """Every leaf as a full numpy array in this process (gathered from other processes if needed;
    with several processes, every process must call it)."""
    return jax.tree.map(_host_array, tree)


def params_hash(tree: Any) -> str:
    """sha256 over (path, dtype, shape, bytes) of every leaf, leaves sorted by path.

    Independent of the sharding and of the container classes (nnx.State or plain dicts).
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    digest = hashlib.sha256()
    for name, leaf in sorted(((canonical_path(p), x) for p, x in leaves), key=lambda t: t[0]):
        arr = np.ascontiguousarray(_host_array(leaf))
        digest.update(f"{name}|{arr.dtype.name}|{arr.dtype.byteorder}|{arr.shape}\n".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def tree_summary(tree: Any) -> dict[str, list]:
    """{path: [dtype, shape]} of every leaf, for metadata files."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {canonical_path(p): [str(np.dtype(x.dtype)), list(x.shape)] for p, x in leaves}


# ----------------------------------------------------------------------------- small files


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e, "file") from e


def write_json(path: pathlib.Path, obj: Any) -> None:
    write_text_atomic(pathlib.Path(path), json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: pathlib.Path) -> Any:
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def write_config(run: str | os.PathLike, config: dict) -> pathlib.Path:
    """Write the resolved config as RUN/config.yaml (atomically)."""
    path = pathlib.Path(run) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_primary():
        write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
    return path


def read_config(run: str | os.PathLike) -> dict:
    path = pathlib.Path(run) / CONFIG_FILE
    if not path.exists():
        raise RunNotFoundError(f"{path}: no config in run directory")
    data = read_yaml(path, CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping at top level")
    return data


def append_metrics(run: str | os.PathLike, record: dict) -> None:
    """Append one JSON line to RUN/metrics.jsonl (numbers converted to plain floats/ints)."""
    if not is_primary():
        return
    clean = {k: _plain(v) for k, v in record.items()}
    path = pathlib.Path(run) / METRICS_FILE
    line = json.dumps(clean, sort_keys=True) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            start = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError:
                f.truncate(start)  # never leave a partial line
                raise
    except OSError as e:
        raise write_error(path, e, "metrics") from e


def truncate_metrics(run: str | os.PathLike, stage: str, after_step: int) -> int:
    """Drop RUN/metrics.jsonl records of `stage` with a step beyond `after_step` (logged after the
    checkpoint a resume restarts from, so that every step is logged once); returns how many."""
    path = pathlib.Path(run) / METRICS_FILE
    if not is_primary() or not path.exists():
        return 0
    records = read_metrics(run)
    kept = [r for r in records if not (r.get("stage") == stage and "event" not in r and r.get("step", 0) > after_step)]
    if len(kept) != len(records):
        write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return len(records) - len(kept)


def read_metrics(run: str | os.PathLike) -> list[dict]:
    path = pathlib.Path(run) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}:{n}: not valid JSON ({e})") from None
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v


def require_run(run: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(run)
    if not path.is_dir():
        raise RunNotFoundError(f"{path}: run directory does not exist")
    return path


# ----------------------------------------------------------------------------- abstract targets


def abstract_tree(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for `tree` (arrays or ShapeDtypeStructs) carrying `shardings`.

    `shardings` is a pytree of the same structure or a single sharding for every leaf; None
    keeps each leaf's own sharding (if it has one).
    """
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings or getattr(x, "sharding", None)),
            tree,
        )
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------- whole-folder params


def _clean_tmp(parent: pathlib.Path, name: str) -> None:
    for stale in parent.glob(f"{TMP_PREFIX}{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _save_params_folder(
    dest: pathlib.Path, params: Any, meta: dict, overwrite: bool, what: str
) -> pathlib.Path:
    """Write params + meta.json to a temporary sibling folder, then rename it to `dest`."""
    dest = pathlib.Path(dest)
    if (dest / META_FILE).exists() and not overwrite:
        raise CheckpointExistsError(f"{dest}: {what} checkpoint already exists (pass overwrite to replace it)")
    _quiet_orbax_errors()
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}-{uuid.uuid4().hex[:8]}")
    tmp = pathlib.Path(_broadcast_str(str(tmp)))
    try:
        if is_primary():
            dest.parent.mkdir(parents=True, exist_ok=True)
            _clean_tmp(dest.parent, dest.name)
            tmp.mkdir()  # fails at once on a read-only or full disk, before Orbax starts threads
        barrier("save_params_folder_tmp")
        # the synchronous checkpointer raises write errors here instead of in a background thread
        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        try:
            ckptr.save((tmp / PARAMS_DIR).absolute(), params)  # Orbax needs absolute paths
        finally:
            ckptr.close()
        meta = dict(meta, hash=params_hash(params), tree=tree_summary(params), written=time.time())
        if is_primary():
            write_json(tmp / META_FILE, meta)
            if dest.exists():  # incomplete leftover, or overwrite requested
                trash = dest.with_name(f"{TMP_PREFIX}{dest.name}-old-{uuid.uuid4().hex[:8]}")
                os.replace(dest, trash)
                os.replace(tmp, dest)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, dest)
    except Exception as e:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WriteError):
            raise
        if is_write_failure(e):
            raise write_error(dest, e, f"{what} checkpoint") from e
        raise
    barrier("save_params_folder")
    return dest


def _load_params_folder(src: pathlib.Path, target: Any, what: str, verify: bool) -> tuple[Any, dict]:
    src = pathlib.Path(src)
    if not (src / META_FILE).exists():
        raise RunNotFoundError(f"{src}: no complete {what} checkpoint")
    meta = read_json(src / META_FILE)
    old = _old_layer_layout(meta.get("tree", {}), target)
    ckptr = ocp.StandardCheckpointer()
    try:
        params = ckptr.restore((src / PARAMS_DIR).absolute(), _layers.unstack_layers(target) if old else target)
    except Exception as e:  # orbax raises assorted types for structure/shape mismatches
        raise CheckpointError(f"{src}: cannot restore {what} parameters: {str(e).splitlines()[0]}") from e
    finally:
        ckptr.close()
    if verify:
        got = params_hash(params)
        if got != meta.get("hash"):
            raise HashMismatchError(
                f"{src}: {what} parameters do not match their recorded content hash "
                f"(recorded {str(meta.get('hash'))[:12]}, found {got[:12]})"
            )
    if old:  # written before decoder layers were stacked: verified as written, then stacked
        params = _layers.stack_layers(params, _shardings(target))
    return params, meta


def _old_layer_layout(saved_paths, target: Any) -> bool:
    """A checkpoint saved with per-layer model parameters (layers/0/...) restored onto stacked ones."""
    return _layers.is_per_layer(saved_paths) and not _layers.is_per_layer(tree_summary(target))


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: getattr(x, "sharding", None), tree)


def _broadcast_str(s: str) -> str:
    if jax.process_count() == 1:
        return s
    from jax.experimental import multihost_utils

    data = np.frombuffer(s.encode().ljust(1024, b"\0"), dtype=np.uint8)
    out = multihost_utils.broadcast_one_to_all(data)
    return bytes(np.asarray(out)).rstrip(b"\0").decode()


# ----------------------------------------------------------------------------- reference


def reference_path(run: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(run) / REFERENCE_DIR


def has_reference(run: str | os.PathLike) -> bool:
    return (reference_path(run) / META_FILE).exists()


def save_reference(run: str | os.PathLike, params: Any, meta: dict | None = None, overwrite: bool = False) -> str:
    """Write RUN/reference once; returns its content hash. Refuses to replace one unless `overwrite`."""
    dest = _save_params_folder(reference_path(run), params, dict(meta or {}), overwrite, "reference")
    return read_json(dest / META_FILE)["hash"]


def reference_hash(run: str | os.PathLike) -> str:
    """The recorded content hash of RUN/reference (no parameters are read)."""
    path = reference_path(run) / META_FILE
    if not path.exists():
        raise RunNotFoundError(f"{reference_path(run)}: no complete reference checkpoint")
    return read_json(path)["hash"]


def load_reference(run: str | os.PathLike, target: Any) -> tuple[Any, dict]:
    """Restore RUN/reference onto `target` (abstract tree with shardings) and verify its hash."""
    return _load_params_folder(reference_path(run), target, "reference", verify=True)


def verify_reference(run: str | os.PathLike, params: Any) -> str:
    """Check that in-memory `params` equal RUN/reference's recorded hash; returns the hash."""
    expected = reference_hash(run)
    got = params_hash(params)
    if got != expected and _old_layer_layout(read_meta(reference_path(run)).get("tree", {}), params):
        got = params_hash(_layers.unstack_layers(params))  # a reference written before layers were stacked
    if got != expected:
        raise HashMismatchError(
            f"{reference_path(run)}: reference parameters given differ from the run's reference "
            f"(recorded {expected[:12]}, given {got[:12]}); use a new run directory"
        )
    return got


def read_meta(folder: str | os.PathLike) -> dict:
    """meta.json of a reference or forget folder."""
    return read_json(pathlib.Path(folder) / META_FILE)


# ----------------------------------------------------------------------------- forget


def forget_name(alpha: float, eta: float | None = None) -> str:
    name = f"alpha_{float(alpha)}"
    return name if eta is None else f"{name}_eta_{float(eta)}"


def forget_path(run: str | os.PathLike, alpha: float, eta: float | None = None) -> pathlib.Path:
    return pathlib.Path(run) / FORGET_DIR / forget_name(alpha, eta)


def save_forget(
    run: str | os.PathLike,
    params: Any,
    alpha: float,
    source_step: int,
    eta: float | None = None,
    meta: dict | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write RUN/forget/alpha_A[_eta_E] with metadata alpha, eta, source_step (and `meta`)."""
    info = dict(meta or {}, alpha=float(alpha), eta=None if eta is None else float(eta), source_step=int(source_step))
    return _save_params_folder(forget_path(run, alpha, eta), params, info, overwrite, "forget")


def load_forget(run: str | os.PathLike, alpha: float, target: Any, eta: float | None = None) -> tuple[Any, dict]:
    """Restore a forget checkpoint onto `target`, verifying its content hash."""
    return _load_params_folder(forget_path(run, alpha, eta), target, "forget", verify=True)


def list_forget(run: str | os.PathLike) -> list[dict]:
    """Metadata of every complete forget checkpoint in RUN (each with a 'path' entry)."""
    root = pathlib.Path(run) / FORGET_DIR
    out = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if not d.name.startswith(TMP_PREFIX) and (d / META_FILE).exists():
                out.append(dict(read_json(d / META_FILE), path=str(d)))
    return out


# ----------------------------------------------------------------------------- memorised steps


class MemorizedCheckpoints:
    """Orbax CheckpointManager over RUN/memorized (or RUN/<subdir>, e.g. "finetune"): params,
    opt_state (any pytree), RNG key and data position per step.

    Saves are asynchronous (the device-to-host copy happens before `save` returns, so the saved
    arrays may be donated right after); call `wait_until_finished()` or `close()` before exit.
    Only finalised steps are listed; Orbax's temporary folders left by a crash are removed.
    """

    def __init__(
        self,
        run: str | os.PathLike,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        subdir: str = MEMORIZED_DIR,
    ):
        self.directory = pathlib.Path(run).absolute() / subdir
        self._failed = False
        _quiet_orbax_errors()
        try:
            if is_primary() and self.directory.is_dir():  # unfinalised steps left by a crash
                for stale in self.directory.glob("*.orbax-checkpoint-tmp*"):
                    shutil.rmtree(stale, ignore_errors=True)
            barrier("memorized_cleanup")
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                create=True,
            )
            self.manager = ocp.CheckpointManager(
                self.directory, item_names=("params", "opt_state", "rng", "position"), options=options
            )
        except OSError as e:
            raise write_error(self.directory, e, "checkpoints") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, rng: jax.Array, position: dict) -> None:
        """Start saving step `step` (returns once the arrays are copied off the devices).

        The content hashes of params, opt_state and rng are recorded in the step's position
        (key "hashes") and checked by `restore`.
        """
        key_data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
        # a host copy: the key lives on one local device, which Orbax cannot save from several processes
        key_data = np.asarray(jax.device_get(key_data))
        rng_item = {"key": key_data}
        hashes = {"params": params_hash(params), "opt_state": params_hash(opt_state), "rng": params_hash(rng_item)}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            rng=ocp.args.StandardSave(rng_item),
            position=ocp.args.JsonSave(dict({k: _plain(v) for k, v in position.items()}, hashes=hashes)),
        )
        self._guard(lambda: self.manager.save(step, args=args, force=True))

    def _guard(self, fn):
        """Run a manager call that may write; Orbax write failures become one CheckpointWriteError."""
        try:
            return fn()
        except Exception as e:
            self._failed = True
            if is_write_failure(e):
                try:  # let saves already in flight finish, so the message names the last complete step
                    self.manager.wait_until_finished()
                except Exception:
                    pass
                # an asynchronous save fails when a later call waits for it: name the folder, not a step
                raise write_error(self.directory, e, f"checkpoint (last complete step: {self._last_complete()})") from e
            raise

    def _last_complete(self) -> str:
        try:
            steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
        except OSError:
            steps = []
        return str(steps[-1]) if steps else "none"

    def restore(
        self,
        params_target: Any,
        opt_state_target: Any = None,
        step: int | None = None,
        rng_impl: str | None = "threefry2x32",
    ) -> dict:
        """Restore a step (default: latest) as {'step', 'params', 'opt_state', 'rng', 'position'}.

        With `opt_state_target` None only params, rng and position are read. The rng comes back
        as a typed key of `rng_impl` (raw key data if `rng_impl` is None).
        """
        if step is None:
            step = self.latest_step()
        if step is None:
            raise RunNotFoundError(f"{self.directory}: no complete memorised checkpoint")
        if step not in self.manager.all_steps():
            raise RunNotFoundError(f"{self.directory}: no memorised checkpoint for step {step}")
        key_shape = jax.random.key_data(jax.random.key(0, impl=rng_impl or "threefry2x32")).shape
        items = {
            "params": ocp.args.StandardRestore(params_target),
            "rng": ocp.args.StandardRestore({"key": np.zeros(key_shape, np.uint32)}),
            "position": ocp.args.JsonRestore(),
        }
        if opt_state_target is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_state_target)
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            got = self._restore_per_layer(step, items)  # written before decoder layers were stacked? (verified)
            if got is None:
                raise CheckpointError(
                    f"{self.directory}/{step}: cannot restore memorised checkpoint: {str(e).splitlines()[0]}"
                ) from e
        else:
            self._verify(step, got, opt_state_target is not None)
        key = jnp.asarray(got["rng"]["key"])
        if rng_impl is not None:
            key = jax.random.wrap_key_data(key, impl=rng_impl)
        return {
            "step": step,
            "params": got["params"],
            "opt_state": got["opt_state"] if opt_state_target is not None else None,
            "rng": key,
            "position": {k: v for k, v in dict(got["position"]).items() if k != "hashes"},
        }

    def _verify(self, step: int, got: dict, with_opt_state: bool) -> None:
        hashes = dict(got["position"]).get("hashes")
        where = f"{self.directory}/{step}"
        if not isinstance(hashes, dict):
            raise HashMismatchError(f"{where}: checkpoint has no recorded content hash; it cannot be verified "
                                    "(written by an older version or damaged); delete it to train that part again")
        items = ["params", "rng"] + (["opt_state"] if with_opt_state else [])
        for item in items:
            got_hash = params_hash(got[item])
            if got_hash != hashes.get(item):
                raise HashMismatchError(
                    f"{where}: memorised {item} do not match their recorded content hash "
                    f"(recorded {str(hashes.get(item))[:12]}, found {got_hash[:12]}); the checkpoint is damaged: "
                    "delete this step folder to resume from an earlier one"
                )

    def _restore_per_layer(self, step: int, items: dict) -> dict | None:
        """Restore a step saved with per-layer model parameters onto the stacked targets (verified against its
        recorded hashes, then params and opt_state stacked); None when the step is not of that layout either."""
        targets = {k: items[k].item for k in ("params", "opt_state") if k in items}
        if _layers.is_per_layer(tree_summary(targets)):
            return None
        old = dict(items, **{k: ocp.args.StandardRestore(_layers.unstack_layers(t)) for k, t in targets.items()})
        try:
            got = dict(self.manager.restore(step, args=ocp.args.Composite(**old)))
        except Exception:
            return None
        self._verify(step, got, "opt_state" in targets)  # the hashes were recorded on the tree as written
        for k, t in targets.items():
            got[k] = _layers.stack_layers(got[k], _shardings(t))
        return got

    def wait_until_finished(self) -> None:
        self._guard(self.manager.wait_until_finished)

    def close(self) -> None:
        """Wait for pending saves and release Orbax's threads (after a failed save: release only)."""
        try:
            if not self._failed:
                self.wait_until_finished()
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._failed:
                    raise

    def __enter__(self) -> "MemorizedCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
