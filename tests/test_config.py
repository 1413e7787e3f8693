"""Config: YAML loading, typed overrides, clear errors, round trip through save_yaml."""

import pytest
import yaml

from jaxunlearn.config import ConfigError, RunConfig, load_config, save_yaml, to_dict


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=3e-4", "mesh.fsdp=2", "method.momentum=true", "data.buckets=[32, 64, 128]",
                             "model.hf_folder=/tmp/x", "method.alphas=[1, 2]", "train.clip_norm=1"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.mesh.fsdp == 2 and cfg.method.params.momentum is True
    assert cfg.data.buckets == (32, 64, 128)
    assert cfg.method.params.alphas == (1.0, 2.0) and all(isinstance(a, float) for a in cfg.method.params.alphas)
    assert cfg.train.clip_norm == 1.0 and cfg.model.hf_folder == "/tmp/x"
    # untouched fields keep their defaults
    assert cfg.train.weight_decay == RunConfig().train.weight_decay
    # null resets an optional field
    assert load_config(None, ["model.hf_folder=/a", "model.hf_folder=null"]).model.hf_folder is None


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lr=fast", ["train.lr", "number", "fast"]),
        ("train.batch_size=2.5", ["train.batch_size", "integer"]),
        ("train.nope=1", ["unknown key", "train.nope"]),
        ("nosection.x=1", ["unknown key", "nosection"]),
        ("train.lr.x=1", ["train.lr", "not a section"]),
        ("method.momentum=maybe", ["method.momentum", "true/false"]),
        ("train.lr", ["key=value"]),
        ("data.benchmark=imagenet", ["benchmark", "imagenet"]),
        ("data.max_len=100", ["buckets", "max_len=100"]),
        ("mesh.data=0", ["mesh.data"]),
        ("method.eta=1.5", ["eta"]),
        ("method.beta=0", ["method.beta", "> 0"]),
        ("method.alpha=-1", ["method.alpha", "> 0"]),
        ("method.alphas=[]", ["method.alphas", "non-empty"]),
        ("train.batch_size=0", ["batch_size"]),
        ("model.hf_folder=[1]", ["model.hf_folder", "str or null"]),
        ("train.max_steps=x", ["train.max_steps", "int or null"]),
    ],
)
def test_override_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_yaml_roundtrip_and_file_errors(tmp_path):
    cfg = load_config(None, ["train.lr=2e-5", "method.alpha=8", "run_dir=runs/a"])
    path = tmp_path / "run.yaml"
    save_yaml(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-5\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml\.train\.epoch: unknown key"):
        load_config(bad)
    bad.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml\.train: expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("train:\n  lr: [1e-5\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML .*line 2") as err:
        load_config(bad)
    assert "\n" not in str(err.value)  # one line, position kept (the CLI prints the first line only)
    # overrides apply on top of the file
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lr: 1.0e-5\n  epochs: 3\n")
    cfg = load_config(good, ["train.epochs=4"])
    assert cfg.train.epochs == 4 and cfg.train.lr == pytest.approx(1e-5)


def test_method_section_selects_a_method_with_its_own_defaults(tmp_path):
    from jaxunlearn.methods import get_method

    cfg = load_config(None, ["method=simnpo", "method.delta=0.5"])
    # SimNPO's own published defaults, never MOX's (beta 0.1) or another method's
    assert cfg.method.name == "simnpo" and cfg.method.params.beta == 4.5 and cfg.method.params.gamma == 0.125
    assert cfg.method.params.delta == 0.5
    assert to_dict(cfg)["method"] == {"name": "simnpo", "beta": 4.5, "delta": 0.5, "gamma": 0.125, "alpha": 1.0,
                                      "retain_loss": "nll", "nll_reduction": "token"}
    # method.name=X switches too, and resets to X's defaults
    assert load_config(None, ["method.alpha=8", "method.name=npo"]).method.params == get_method("npo").params()
    # YAML: a name alone, or a mapping; the saved run config reads back equal
    (tmp_path / "a.yaml").write_text("method: ga\n")
    assert load_config(tmp_path / "a.yaml").method.name == "ga"
    (tmp_path / "b.yaml").write_text("method: {name: graddiff, retain_loss: kl}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.method.params.retain_loss == "kl"
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["method=bogus"], ["method.name", "unknown method 'bogus'", "mox", "npo"]),
        (["method=npo", "method.eta=0.5"], ["method.eta", "unknown key for method 'npo'", "beta, gamma"]),
        (["method=npo", "method.retain_loss=mse"], ["method.retain_loss", "nll, kl", "mse"]),
        (["method=simnpo", "method.beta=0"], ["method.beta", "> 0"]),
        (["method.objective=npo"], ["method.objective", "mox_npo"]),
        (["mox.alpha=2"], ["mox", "method.alpha"]),
        (["method.a.b=1"], ["one level deep"]),
    ],
)
def test_method_errors_are_one_line_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_old_mox_section_in_yaml_points_to_method(tmp_path):
    (tmp_path / "old.yaml").write_text("mox: {alpha: 4.0}\n")
    with pytest.raises(ConfigError, match=r"old\.yaml\.mox: the mox section is now the method section"):
        load_config(tmp_path / "old.yaml")
