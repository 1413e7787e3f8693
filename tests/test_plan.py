"""`jaxunlearn plan`: the real train step compiled ahead of time against abstract parameters."""

import contextlib
import io
import json

import pytest

from jaxunlearn import cli
from jaxunlearn.models import ModelConfig
from jaxunlearn.plan import PlanSpec, analytic_flops, model_config, plan, run_config, simulate_devices


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One CLI plan of a tiny shape on the 8 test devices (JSON written)."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["plan", "tiny-llama", "--devices", "8", "--fsdp", "8", "--forget", "8", "--retain", "8",
                         "--seq-len", "64", "--loss-chunk", "16", "--json", str(out)])
    assert code == 0
    return dict(json.loads(out.read_text()), printed=printed.getvalue())


def test_plan_reports_memory_flops_and_compile_time(planned):
    mem = planned["memory_per_device"]
    assert planned["devices"] == 8 and planned["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # XLA's argument bytes are what the abstract inputs put on one device (up to a few scalars)
    assert mem["arguments"] == pytest.approx(sum(planned["arguments_per_device"].values()), rel=0.01)
    held = planned["arguments_per_device"]
    assert held["opt_state"] >= 2 * held["params"] > 0 and held["reference"] == held["params"]
    assert mem["temporaries"] > 0 and mem["total"] == mem["arguments"] + mem["temporaries"] + mem["outputs"] - mem["aliased"]
    assert mem["aliased"] > 0  # params and optimiser state are donated
    assert planned["flops_per_step_xla"] > 0 and planned["flops_per_step_analytic"] > 0
    assert planned["compile_seconds"] > 0
    assert "memory per device:" in planned["printed"] and "FLOPs per step" in planned["printed"]


def test_bf16_reference_halves_its_bytes():
    small = dict(shape="tiny-llama", forget=8, retain=8, seq_len=16, fsdp=8, loss_chunk=0, remat="none")
    got = plan(PlanSpec(**small, reference_dtype="bfloat16"))
    assert got["arguments_per_device"]["reference"] * 2 == got["arguments_per_device"]["params"]


def test_named_shapes_and_errors(tmp_path):
    cfg = model_config(PlanSpec(shape="Llama-3.1-8B"))
    assert (cfg.vocab_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (128256, 32, 8, 128)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ModelConfig.preset("tiny-phi").to_hf_dict()))
    assert model_config(PlanSpec(shape=str(folder))).arch == "phi"
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        model_config(PlanSpec(shape="nope"))
    with pytest.raises(ValueError, match="plan.model.remat: unknown remat 'some'"):
        run_config(PlanSpec(shape="tiny-llama", remat="some"))
    with pytest.raises(ValueError, match="--devices 16: JAX is already running with 8 devices"):
        simulate_devices(16)
    # an expected error: exit 1 with one line (jaxunlearn.cli's exit convention)
    assert cli.main(["plan", "tiny-llama", "--forget", "3", "--seq-len", "8"]) == 1  # 3 not divisible by 8


def test_analytic_flops_counts_reference_forwards():
    cfg = ModelConfig.preset("tiny-llama")
    n = 10**6 - cfg.vocab_size * cfg.hidden_size
    forward = 2 * n + 4 * cfg.num_layers * 10 * cfg.num_heads * cfg.head_dim  # per token, T = 10
    mox = PlanSpec(shape="tiny-llama", forget=2, retain=3, seq_len=10, objective="mox")
    assert analytic_flops(cfg, 10**6, mox) == forward * 10 * (3 * 5 + 3)  # reference on retain
    npo = PlanSpec(shape="tiny-llama", forget=2, retain=3, seq_len=10, objective="npo")
    assert analytic_flops(cfg, 10**6, npo) == forward * 10 * (3 * 5 + 2)  # reference on forget
    graddiff = PlanSpec(shape="tiny-llama", forget=2, retain=3, seq_len=10, objective="graddiff")
    assert analytic_flops(cfg, 10**6, graddiff) == forward * 10 * 3 * 5
