"""experiments/tofu_cpu_study.py --tiny: the whole study (few TOFU rows, tiny model, few steps) end to end,
then rerun: every finished stage is skipped."""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_script(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tofu_cpu_study_tiny_and_resume(tofu_dir, tmp_path):
    study = load_script(REPO / "experiments" / "tofu_cpu_study.py")
    out = tmp_path / "out"
    argv = ["--tiny", "--tofu-dir", str(tofu_dir), "--work", str(tmp_path / "work"), "--out", str(out),
            "--methods", "GA", "MOX"]
    assert study.main(argv) == 0
    table = (out / "results.md").read_text()
    for row in ("Original (reference)", "Retrained (retain90)", "| GA |", "MOX α=4", "MOX momentum", "α=0.5", "α=8",
                "GA epoch 1", "GA epoch 2", "MOX epoch 1", "MOX epoch 2"):
        assert row in table, row
    for name in ("tradeoff.png", "epochs.png", "command.txt", "configs/reference.yaml", "configs/methods__mox.yaml",
                 "summaries/mox/epoch_1/alpha_4.0.summary.json", "summaries/ga/epoch_2/trained.summary.json"):
        assert (out / name).is_file(), name
    assert "--tiny" in (out / "command.txt").read_text()
    # the table reports real numbers: the reference was evaluated against the retain model
    assert "| Original (reference) | n/a" not in table

    before = (out / "commands.sh").read_text().splitlines()
    assert study.main(argv) == 0  # resumed: nothing is trained or evaluated again
    added = (out / "commands.sh").read_text().splitlines()[len(before):]
    assert added and all(line.startswith("jaxunlearn extrapolate") for line in added), added
