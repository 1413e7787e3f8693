"""Test set-up: 8 simulated CPU devices so every sharded path runs in CI, and one persistent
compilation cache for the whole test session (see `_session_compile_cache`)."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from jaxunlearn import compile_cache  # noqa: E402


def _session_compile_cache() -> str | None:
    """A fresh compilation cache folder for this test session, shared by every pytest-xdist worker and
    every CLI subprocess (all inherit the variable set here by the first process), so a program that
    several tests or commands compile is compiled once. Concurrent use is safe: compile_cache caps the
    folder, which makes JAX lock it around each read and write. A JAXUNLEARN_COMPILE_CACHE already set
    (a folder, or off) is kept. Returns the folder this process created, if any."""
    if compile_cache.ENV in os.environ:
        return None
    folder = tempfile.mkdtemp(prefix="jaxunlearn-test-xla-cache-")
    os.environ[compile_cache.ENV] = folder
    return folder


_CREATED_CACHE = _session_compile_cache()
compile_cache.enable()  # in-process tests too: the same programs recur across test files


def pytest_unconfigure(config):
    if _CREATED_CACHE and not hasattr(config, "workerinput"):  # the process that made it, after its workers
        shutil.rmtree(_CREATED_CACHE, ignore_errors=True)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tofu_dir() -> pathlib.Path:
    """The real TOFU JSONL folder (JAXUNLEARN_TOFU_DIR, default ../shared/data/tofu)."""
    path = pathlib.Path(os.environ.get("JAXUNLEARN_TOFU_DIR", REPO.parent / "shared" / "data" / "tofu"))
    if not (path / "full.jsonl").exists():
        pytest.fail(f"TOFU data not found at {path}; set JAXUNLEARN_TOFU_DIR")
    return path
