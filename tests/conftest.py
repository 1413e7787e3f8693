"""Test set-up: 8 simulated CPU devices so every sharded path runs in CI."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tofu_dir() -> pathlib.Path:
    """The real TOFU JSONL folder (JAXUNLEARN_TOFU_DIR, default ../shared/data/tofu)."""
    path = pathlib.Path(os.environ.get("JAXUNLEARN_TOFU_DIR", REPO.parent / "shared" / "data" / "tofu"))
    if not (path / "full.jsonl").exists():
        pytest.fail(f"TOFU data not found at {path}; set JAXUNLEARN_TOFU_DIR")
    return path
