"""experiments/bench/gpu_check.py --tiny: the accelerator check's CPU smoke mode runs the MOX step over
every (simulated) device with the flags a GPU run uses, and its numerical checks hold."""

import json

from test_experiments import REPO, load_script


def test_gpu_check_tiny_runs_sharded_with_remat(tmp_path):
    out = tmp_path / "gpu_check.json"
    script = load_script(REPO / "experiments" / "bench" / "gpu_check.py")
    assert script.main(["--tiny", "--steps", "3", "--remat", "full", "--attention", "xla", "--out", str(out)]) in (0, None)
    report = json.loads(out.read_text())
    step = report["mox_step"]["tiny"]
    assert report["backend"] == "cpu" and report["devices"] == step["devices"] == 8  # tests/conftest.py's 8 devices
    assert step["remat"] == "full" and step["fits"] and step["finite"] and step["tokens_per_s"] > 0
    first, last = step["forget_nll_first_last"]
    assert last < first  # memorisation: the forget NLL falls on a repeated batch
    checks = report["checks"]
    assert checks["bitwise_repeatable"] is True
    assert checks["extrapolate"]["mem_deleted_after_donation"] is True
    assert checks["generate"]["tokens_per_s"] > 0
