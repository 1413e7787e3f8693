"""What `jaxunlearn eval` writes: only process 0 writes, every file atomically, and a damaged summary
is a one-line error naming it."""

import json

import pytest

from jaxunlearn import distributed
from jaxunlearn.errors import JaxunlearnError
from jaxunlearn.evals import cli as eval_cli

SUMMARY = {"benchmark_kind": "tofu", "forget_quality": 0.5, "model_utility": 0.25,
           "forget": {"rouge": 0.1}, "retain": {"rouge": 0.2}}


def test_only_process_zero_writes(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    eval_cli._write(tmp_path / "out", "trained", SUMMARY, {"forget": []})
    eval_cli.write_reports(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(distributed, "is_primary", lambda: True)
    eval_cli._write(tmp_path / "out", "trained", SUMMARY, {"forget": []})
    eval_cli.write_reports(tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["results.md", "tradeoff.png", "trained.per_sample.json", "trained.summary.json"]  # no temporaries
    assert json.loads((tmp_path / "out" / "trained.summary.json").read_text()) == SUMMARY


def test_a_truncated_summary_is_named(tmp_path):
    (tmp_path / "a.summary.json").write_text('{"forget_quality": 0.')  # e.g. written by an older, killed eval
    with pytest.raises(JaxunlearnError, match=r"a\.summary\.json: not valid JSON"):
        eval_cli.write_reports(tmp_path)
