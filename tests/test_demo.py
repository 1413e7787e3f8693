"""The demo runs end to end (shortened with --fast) and its settings match experiments/configs."""

import math
import pathlib

import yaml

from jaxunlearn import checkpoint as ck
from jaxunlearn import demo
from jaxunlearn.config import load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"


def test_demo_yaml_mirrors_builtin_settings():
    files = {stage: yaml.safe_load((CONFIGS / f"demo_{stage}.yaml").read_text()) for stage in demo.DEMO}
    assert files == demo.DEMO


def test_paper_configs_load():
    for name in ("tofu_phi15_mox", "tofu_llama2_mox", "muse_news_mox"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.method.name == "mox" and cfg.method.params.alpha == 4.0 and cfg.train.lr == 1e-5 and cfg.train.epochs == 10
        assert cfg.train.weight_decay == 0.01 and cfg.train.batch_size == 32


def test_demo_fast_end_to_end(tmp_path, capsys):
    # --no-tofu: generation-based metrics cost a compile too many here; `jaxunlearn demo` in CI runs them
    assert demo.main(["--fast", "--no-tofu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "forget NLL" in out and "reference" in out
    assert "time per phase" in out and "fine-tune the reference" in out and "total" in out
    ref_run, run = tmp_path / "reference", tmp_path / "unlearn"
    # the unlearning run's reference is the fine-tuned model, hash-identical
    assert ck.reference_hash(ref_run) == ck.reference_hash(run)
    assert [m["alpha"] for m in ck.list_forget(run)] == [4.0]
    table = [r for r in ck.read_metrics(run) if r.get("event") == "demo_table"][0]["table"]
    assert sorted(table) == ["forget (alpha=4)", "reference"]
    seconds = [r for r in ck.read_metrics(run) if r.get("event") == "demo_seconds"][0]["seconds"]
    assert all(s > 0 for s in seconds.values()) and "evaluate: NLL table" in seconds
    for row in table.values():
        assert set(row) == {"forget", "retain", "holdout"}
        assert all(math.isfinite(v) for pair in row.values() for v in pair)
    # fine-tuning taught the reference its training data better than the held-out facts
    assert table["reference"]["forget"][0] < table["reference"]["holdout"][0]
    # extrapolation moved the forget split's NLL up
    assert table["forget (alpha=4)"]["forget"][0] > table["reference"]["forget"][0]
