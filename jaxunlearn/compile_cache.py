"""JAX's persistent compilation cache, on by default for every `jaxunlearn` command.

A second run of the same command (a rerun, a resume, a second `eval`, the demo twice) loads its
compiled XLA programs from disk instead of compiling them again.

Where: `$JAXUNLEARN_COMPILE_CACHE` if set, else JAX's own `JAX_COMPILATION_CACHE_DIR` (or
`jax.config.jax_compilation_cache_dir`) if set, else `$XDG_CACHE_HOME/jaxunlearn/jax`
(`~/.cache/jaxunlearn/jax` without XDG_CACHE_HOME). `JAXUNLEARN_COMPILE_CACHE=off` (or 0, false,
no) switches it off. The folder is capped at MAX_BYTES, least recently used entries evicted first;
that cap also makes JAX lock the folder around each read and write, so concurrent processes
(e.g. pytest-xdist workers, several runs at once) never read a half-written entry.
Adding an entry lists the folder (JAX's eviction check), a cost that grows with the number of
entries (about 20 ms per new program at a few hundred entries); deleting the folder is always safe.

Off in multi-process CPU runs (`multiprocess_cpu`). Every program is cached, however small or fast
to compile (CPU programs compile in well under JAX's default 1 s threshold). A folder that cannot be created or written is reported in one
warning and the command goes on without the cache; JAX itself only warns on a cache entry it
cannot read or write.

Python API users enable the same cache with `jaxunlearn.compile_cache.enable()` before their
first jitted call (the library never changes global JAX settings on its own).
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

ENV = "JAXUNLEARN_COMPILE_CACHE"
OFF_VALUES = frozenset({"off", "0", "false", "no", "none"})
MAX_BYTES = 4 << 30  # 4 GiB; LRU eviction beyond that


def default_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/jaxunlearn/jax, or ~/.cache/jaxunlearn/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jaxunlearn" / "jax"


def chosen_dir() -> pathlib.Path | None:
    """The folder the settings choose (see the module docstring), or None when switched off."""
    import jax

    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    if value:
        return pathlib.Path(value).expanduser()
    if jax.config.jax_compilation_cache_dir:
        return pathlib.Path(jax.config.jax_compilation_cache_dir)
    return default_dir()


def _check_writable(folder: pathlib.Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
        pass


def multiprocess_cpu() -> bool:
    """True in a run of several CPU processes joined by jax.distributed (gloo collectives), where the
    cache stays off: with it, tests/test_multihost.py's two-process resume failed with gloo reporting
    a collective size mismatch (cause not established; GPU/TPU multi-host runs keep the cache)."""
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1 and jax.default_backend() == "cpu"


def enable() -> pathlib.Path | None:
    """Point JAX's persistent compilation cache at the chosen folder; returns it, or None when the
    cache is off or its folder is unusable (one warning, never an error)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    folder = chosen_dir()
    if folder is not None and multiprocess_cpu():
        print("jaxunlearn: compilation cache off: several CPU processes (gloo collectives) loading cached "
              "programs ran mismatched collectives", file=sys.stderr)
        folder = None
    if folder is not None:
        folder = folder.absolute()
        try:
            _check_writable(folder)
        except OSError as err:
            print(f"jaxunlearn: warning: compilation cache off, cannot write {folder} ({err.strerror or err}); "
                  f"set {ENV}=DIR for another folder or {ENV}=off", file=sys.stderr)
            folder = None
    compilation_cache.reset_cache()  # JAX opens the cache once per process; reopen with these settings
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder
