"""The paper scripts' --tiny modes (random tiny model, built-in data): each runs end to end and writes its
table. They share one work folder, as the real scripts do, so the reference is trained once."""

import pytest

from test_experiments import REPO, load_script

PAPER = REPO / "experiments" / "paper"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    return ["--tiny", "--work", str(root / "work"), "--out", str(root / "out")], root / "out"


def run(name: str, args: list[str], *extra: str) -> None:
    assert load_script(PAPER / f"{name}.py").main([*args, *extra]) == 0


def rows(table: str) -> list[str]:
    return [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]


def test_tofu_table_tiny(folders):
    args, out = folders
    run("tofu_table", args, "--methods", "GA", "MOX", "--splits", "forget10")
    table = (out / "tofu_table_tiny.md").read_text()
    assert rows(table) == ["method", "Original", "Retrained", "GA", "MOX α=4", "MOX momentum"]
    assert "| GA | n/a" not in table  # forget quality computed against the retain model


def test_sensitivity_tiny(folders):
    args, out = folders
    run("sensitivity", args, "--alphas", "1", "4", "--etas", "0.5")
    assert rows((out / "sensitivity_tiny.md").read_text()) == ["alpha", "1", "4", "eta", "0.5"]


def test_relearn_tiny(folders):
    args, out = folders
    run("relearn", args, "--methods", "GA", "--relearn-steps", "2")
    assert rows((out / "relearn_tiny.md").read_text()) == ["method", "GA, before", "GA, after relearning"]


def test_continual_tiny(folders):
    args, out = folders
    run("continual", args, "--methods", "GA")
    assert rows((out / "continual_tiny.md").read_text()) == ["method, stage", "GA, forget01", "GA, forget05",
                                                              "GA, forget10"]


def test_muse_news_tiny(folders):
    args, out = folders
    run("muse_news", args, "--methods", "GA")
    table = (out / "muse_news_tiny.md").read_text()
    assert rows(table) == ["method", "Original (target)", "GA"]
    assert "| Original (target) | n/a" not in table  # VerbMem computed
