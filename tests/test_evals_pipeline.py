"""TOFU / MUSE pipelines, reports and `jaxunlearn eval` on a tiny random model and a small synthetic benchmark."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from scipy import stats

from jaxunlearn import checkpoint as ck
from jaxunlearn.data import MuseBenchmark, prompt_format_for, synthetic_benchmark, synthetic_tokenizer
from jaxunlearn import cli as main_cli
from jaxunlearn.config import ConfigError
from jaxunlearn.evals import cli, report
from jaxunlearn.evals import metrics as M
from jaxunlearn.evals.evaluator import Evaluator
from jaxunlearn.evals.muse import evaluate_muse
from jaxunlearn.evals.tofu import evaluate_split, evaluate_splits, evaluate_tofu, load_forget_ratios
from jaxunlearn.models import ModelConfig, init_model, split_params
from jaxunlearn.sharding import make_mesh

N_NEW = 6
BUCKETS = (64,)  # one shape: one compile per function


@pytest.fixture(scope="module")
def full_bench():
    return synthetic_benchmark(seed=0, n_entities=5, n_forget=1, facts_per_entity=3, n_perturbed=3)


@pytest.fixture(scope="module")
def bench(full_bench):
    extra = {k: v[:4] for k, v in full_bench.extra_evals.items()}
    return dataclasses.replace(full_bench, extra_evals=extra)


@pytest.fixture(scope="module")
def tok(full_bench):
    return synthetic_tokenizer(full_bench, vocab_size=384)


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig.preset("tiny-llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return init_model(cfg, seed=0)


@pytest.fixture(scope="module")
def ev(model, tok):
    graphdef, params = split_params(model)
    return Evaluator.create(graphdef, params, model.config, tok, prompt_format_for(tok, "qa"), batch_size=8,
                            buckets=BUCKETS, max_len=64)


@pytest.fixture(scope="module")
def tofu_result(ev, bench):
    return evaluate_tofu(ev, bench, max_new_tokens=N_NEW, model_name="tiny")


def test_tofu_summary_records_sizes_and_is_consistent(tofu_result, bench):
    summary, per_sample = tofu_result
    assert summary["model"] == "tiny" and summary["benchmark"] == bench.name and summary["whole_splits"]
    assert summary["sizes"]["forget"] == len(bench.forget_perturbed)
    assert summary["sizes"]["retain"] == len(bench.retain_perturbed)
    assert summary["sizes"]["real_authors"] == len(bench.extra_evals["real_authors"])
    assert len(per_sample["world_facts"]) == len(bench.extra_evals["world_facts"])
    assert summary["forget_quality"] is None  # no retain model values: undefined, not 0
    # aggregates recomputed from the per-sample records with the published formulas
    f = per_sample["forget"]
    r = np.array([x["truth_ratio"] for x in f])
    assert summary["forget"]["truth_ratio"] == pytest.approx(np.mean(np.minimum(r, 1 / r)))
    for x in f:
        assert x["prob"] == pytest.approx(math.exp(-x["mean_nll"]))
        assert x["truth_ratio"] == pytest.approx(math.exp(x["true_mean_nll"] - np.mean(x["perturbed_mean_nll"])))
        assert 0.0 <= x["rouge_recall"] <= 1.0 and 0.0 < x["extraction_strength"] <= 1.0
    ra = per_sample["real_authors"][0]
    p_true, p_false = math.exp(-ra["mean_nll"]), np.exp(-np.array(ra["perturbed_mean_nll"])).sum()
    assert ra["prob"] == pytest.approx(p_true / (p_true + p_false))
    nine = [summary[s][m] for s in ("retain", "real_authors", "world_facts") for m in ("prob", "rouge", "truth_ratio")]
    expected = 0.0 if min(nine) == 0 else stats.hmean(nine)
    assert summary["model_utility"] == pytest.approx(expected)
    assert set(summary["mia"]) == {"loss_auc", "zlib_auc", "min_k_auc", "min_k_pp_auc"}
    json.dumps(summary), json.dumps(per_sample)  # JSON-ready


def test_forget_quality_from_saved_retain_values(tofu_result, ev, bench, tmp_path):
    summary, per_sample = tofu_result
    path = tmp_path / "retain.per_sample.json"
    path.write_text(json.dumps(per_sample))
    ratios = load_forget_ratios(path)
    assert M.forget_quality([x["truth_ratio"] for x in per_sample["forget"]], ratios) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same forget split"):
        evaluate_tofu(ev, bench, retain_ratios=ratios[:-1])
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_forget_ratios(bad)


def test_retain_results_from_another_benchmark_are_refused(tofu_result, bench, tmp_path):
    from jaxunlearn.evals.tofu import benchmark_identity

    _, per_sample = tofu_result
    ident = benchmark_identity(bench)
    assert per_sample["benchmark_identity"] == tofu_result[0]["benchmark_identity"] == ident
    assert ident["name"] == bench.name and ident["rows"]["forget_perturbed"] == len(bench.forget_perturbed)
    same = tmp_path / "same.per_sample.json"
    same.write_text(json.dumps(per_sample))
    assert len(load_forget_ratios(same, ident)) == len(bench.forget_perturbed)
    other_bench = synthetic_benchmark(seed=1, n_entities=5, n_forget=1, facts_per_entity=3, n_perturbed=3)
    other = benchmark_identity(other_bench)
    assert other != ident  # same shape, other seed: other rows
    with pytest.raises(ValueError) as e:
        load_forget_ratios(same, other)
    msg = str(e.value)
    assert "\n" not in msg and ident["name"] in msg and other["name"] in msg
    old = tmp_path / "old.per_sample.json"
    old.write_text(json.dumps({k: v for k, v in per_sample.items() if k != "benchmark_identity"}))
    with pytest.raises(ValueError, match="no benchmark identity"):
        load_forget_ratios(old, ident)


def test_reports_order_forget_models_by_alpha_numerically(tmp_path):
    base = {"forget": {"rouge": 0.5}, "forget_quality": 0.1, "model_utility": 0.5}
    for label, alpha in (("alpha_2.0", 2.0), ("alpha_16.0", 16.0), ("reference", None), ("alpha_4.0", 4.0),
                         ("alpha_0.5", 0.5)):
        run = {"method": "mox", **({"alpha": alpha} if alpha is not None else {})}
        (tmp_path / f"{label}.summary.json").write_text(json.dumps({**base, "run": run}))
    cli.write_reports(tmp_path)
    labels = [line.split(" | ")[0][2:] for line in (tmp_path / "results.md").read_text().splitlines()[2:]]
    assert labels == ["reference", "alpha_0.5", "alpha_2.0", "alpha_4.0", "alpha_16.0"]
    assert report.sort_key("alpha_16.0_eta_0.9", {}) > report.sort_key("alpha_2.0_eta_0.9", {})


def test_tofu_eight_devices_equal_one(tofu_result, model, tok, bench):
    assert len(jax.devices()) == 8
    graphdef, params = split_params(model)
    ev8 = Evaluator.create(graphdef, params, model.config, tok, prompt_format_for(tok, "qa"),
                           mesh=make_mesh(data=4, fsdp=2), batch_size=8, buckets=BUCKETS, max_len=64)
    s8, p8 = evaluate_tofu(ev8, bench, max_new_tokens=N_NEW, model_name="tiny")
    s1, p1 = tofu_result
    for split in ("forget", "retain", "real_authors", "world_facts"):
        for k, v in s1[split].items():
            assert s8[split][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (split, k)
        assert [x["generation"] for x in p8[split]] == [x["generation"] for x in p1[split]]
    assert s8["mia"] == pytest.approx(s1["mia"])


def test_muse_pipeline(ev, bench):
    qa = [{"question": r["question"], "answer": r["answer"]} for r in bench.forget[:3]]
    icl = [{"question": "Who?", "answer": "Ann."}]
    mb = MuseBenchmark(
        name="muse-mini", forget=[], retain=[], retain_eval=[], holdout=[],
        verbmem_forget=[{"prompt": r["question"], "gt": r["answer"]} for r in bench.forget[:2]],
        knowmem_forget=qa, knowmem_retain=qa[:2], knowmem_forget_icl=icl, knowmem_retain_icl=icl,
        privleak={"forget": [r["answer"] for r in bench.forget[:3]], "holdout": [r["answer"] for r in bench.holdout[:3]]},
    )
    s, per = evaluate_muse(ev, mb, retrain_auc=0.5, model_name="tiny", verbmem_tokens=N_NEW, knowmem_tokens=N_NEW)
    assert s["sizes"] == {"verbmem_forget": 2, "knowmem_forget": 3, "knowmem_retain": 2,
                          "privleak_forget": 3, "privleak_holdout": 3}
    assert 0.0 <= s["verbmem_forget"] <= 1.0 and 0.0 <= s["knowmem_forget"] <= 1.0
    assert s["privleak_auc"] == pytest.approx(1.0 - s["min_k_auc"])
    assert s["priv_leak"] == pytest.approx((s["privleak_auc"] - 0.5) / 0.5 * 100)
    assert s["retrain_auc_source"] == "--retrain-auc"
    assert all("\n\n" not in x["output"] and "Question" not in x["output"] for x in per["knowmem_forget"])
    assert evaluate_muse(ev, mb, verbmem_tokens=N_NEW, knowmem_tokens=N_NEW)[0]["priv_leak"] is None


class _FakeScorer:
    """Stands in for an Evaluator: forget texts (starting "f") get a low loss, holdout texts a high one."""

    def __init__(self):
        self.calls = []

    def score_texts(self, texts, max_tokens):
        from jaxunlearn.evals.scoring import SampleScore

        self.calls.append(max_tokens)
        out = []
        for i, t in enumerate(texts):
            lp = np.full(8, -0.05 if t.startswith("f") else -3.0) - 0.01 * i
            out.append(SampleScore(logp=lp, z=lp, match=np.ones(8, bool)))
        return out


def test_muse_priv_leak_of_memorised_model_is_minus_100_with_published_retrain_auc():
    from jaxunlearn.evals import muse as muse_eval

    mb = MuseBenchmark(name="muse-news", forget=[], retain=[], retain_eval=[], holdout=[], verbmem_forget=[],
                       knowmem_forget=[], knowmem_retain=[], knowmem_forget_icl=[], knowmem_retain_icl=[],
                       privleak={"forget": [f"f{i}" for i in range(5)], "holdout": [f"h{i}" for i in range(5)]})
    fake = _FakeScorer()
    s, _ = evaluate_muse(fake, mb)
    assert fake.calls == [muse_eval.PRIVLEAK_MAX_TOKENS] * 2 == [2048, 2048]
    assert s["privleak_auc"] == 0.0 and s["min_k_auc"] == 1.0
    assert s["retrain_privleak_auc"] == 0.4772 and "MUSE published" in s["retrain_auc_source"]
    assert s["priv_leak"] == pytest.approx(-100.0)
    s, _ = evaluate_muse(fake, mb, retrain_auc=0.5)
    assert s["priv_leak"] == pytest.approx(-100.0) and s["retrain_auc_source"] == "--retrain-auc"


def test_score_texts_cuts_at_max_tokens_beyond_the_largest_bucket(ev, tok):
    text = " ".join(["The silver river runs north and the old tower stands."] * 20)
    n_ids = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n_ids > 100
    (s,) = ev.score_texts([text], max_tokens=100)  # buckets are (64,): one extra bucket of 101
    assert s.count == 100  # BOS + 100 text tokens, every text token scored, no EOS


def test_mia_scores_as_open_unlearning(ev, bench):
    import zlib

    from jaxunlearn.evals.mia import without_last
    from jaxunlearn.evals.tofu import answer_text, mia_scores

    rows = bench.forget[:3]
    scores = ev.score_qa([(r["question"], r["answer"]) for r in rows])
    got = mia_scores(ev, rows)
    for i, (r, sc) in enumerate(zip(rows, scores)):
        ex = ev.encode_qa(r["question"], r["answer"])
        text = answer_text(ev.tokenizer, ex)
        assert text.strip() == r["answer"]  # the answer alone: no prompt, no EOS
        loss = -sc.logp.mean()  # LOSS: every answer token and EOS
        assert got["loss"][i] == pytest.approx(loss)
        assert got["zlib"][i] == pytest.approx(loss / len(zlib.compress(text.encode("utf-8"))))
        lp = np.sort(sc.logp[:-1])  # Min-K: EOS left out
        assert got["min_k"][i] == pytest.approx(-lp[: max(1, int(lp.size * 0.4))].mean())
        assert got["min_k_pp"][i] == pytest.approx(-np.sort(without_last(sc.z))[: max(1, int(lp.size * 0.4))].mean())


def test_report_table_and_plots(tofu_result, tmp_path):
    summary, _ = tofu_result
    table = report.markdown_table([("a", summary), ("b", {"forget_quality": 0.5, "model_utility": 0.25})])
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | FQ | MU |") and len(lines) == 4
    assert lines[2].split(" | ")[1] == "n/a"  # FQ undefined for summary a
    assert lines[3].split(" | ")[1:3] == ["0.5000", "0.2500"]
    pts = [{"label": f"alpha {a}", "method": "mox", "summary": {"forget_quality": 10.0 ** -a, "model_utility": 0.5 / a}}
           for a in (1, 2, 4)]
    assert report.plot_tradeoff(pts, tmp_path / "t.png").stat().st_size > 1000
    recs = [{"stage": "memorize", "step": s, "loss": 1.0 / s, "kl": 0.1 * s} for s in range(1, 6)]
    recs.append({"stage": "memorize", "event": "resume", "step": 3})
    assert report.plot_training(recs, tmp_path / "m.png").stat().st_size > 1000
    assert report.plot_training([], tmp_path / "none.png") is None


def test_write_reports_names_only_what_it_wrote(tmp_path, capsys):
    # a MUSE-only output folder has no TOFU table: the CLI must not claim to have written one
    (tmp_path / "m.summary.json").write_text(json.dumps({"benchmark": "muse-news", "verbmem_forget": 0.5}))
    cli.write_reports(tmp_path)
    assert not (tmp_path / "results.md").exists()
    assert "results.md" not in capsys.readouterr().out


def _fake_run(tmp_path, model, n_entities):
    """A run directory with a reference and two forget models (no training: the layout is what matters)."""
    from jaxunlearn.config import RunConfig, to_dict
    from jaxunlearn.rundir import reference_meta, model_setup

    run = tmp_path / "run"
    cfg = RunConfig()
    cfg = type(cfg)(**{**cfg.__dict__, "data": type(cfg.data)(**{**cfg.data.__dict__, "synthetic_entities": n_entities,
                                                                   "max_len": 64, "buckets": (32, 64)})})
    ck.write_config(run, to_dict(cfg))
    setup = model_setup(model.config, cfg)
    _, params = split_params(model)
    ck.save_reference(run, params, reference_meta(setup, {"preset": "tiny-llama"}))
    for alpha in (1.0, 2.0):
        ck.save_forget(run, jax.tree.map(lambda x: x * (1.0 - 0.1 * alpha), params), alpha, source_step=1)
    ck.append_metrics(run, {"stage": "memorize", "step": 1, "loss": 2.0})
    ck.append_metrics(run, {"stage": "memorize", "step": 2, "loss": 1.5})
    return run


def test_cli_on_run_directory_sweep(tmp_path, capsys):
    from jaxunlearn.rundir import load_benchmark, load_tokenizer
    from jaxunlearn.config import RunConfig

    cfg = RunConfig()
    cfg = type(cfg)(**{**cfg.__dict__, "data": type(cfg.data)(**{**cfg.data.__dict__, "synthetic_entities": 5})})
    tok = load_tokenizer(cfg, load_benchmark(cfg.data))
    mcfg = ModelConfig.preset("tiny-llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    run = _fake_run(tmp_path, init_model(mcfg, seed=1), 5)
    rc = main_cli.main(["eval", str(run), "--which", "forget", "sweep", "--alpha", "2", "--max-new-tokens", "4",
                   "--batch-size", "8", "--no-mia", "--mesh-data", "1"])
    assert rc == 0, capsys.readouterr().err
    out = run / "eval"
    for label in ("alpha_1.0", "alpha_2.0"):
        s = json.loads((out / f"{label}.summary.json").read_text())
        assert s["run"]["method"] == "mox" and s["sizes"]["forget"] > 0
        # no data options given: the run's own data settings (not eval's defaults)
        assert (s["data"]["synthetic_entities"], s["data"]["max_len"], s["data"]["buckets"]) == (5, 64, [32, 64])
    assert json.loads((out / "alpha_2.0.summary.json").read_text())["run"]["alpha"] == 2.0
    table = (out / "results.md").read_text()
    assert "| alpha_1.0 |" in table and "| alpha_2.0 |" in table
    assert table.count("| alpha_2.0 |") == 1  # asked for by both `forget` and `sweep`: evaluated once
    assert (out / "tradeoff.png").exists() and (out / "training.png").exists()


def test_eval_options_override_the_run_data_settings():
    from jaxunlearn.config import DataSpec
    from jaxunlearn.evals.cli import _parser, data_spec

    run = DataSpec(synthetic_entities=5, max_len=64, buckets=(32, 64), forget_split="forget05")
    assert data_spec(_parser().parse_args(["RUN"]), run) == run
    spec = data_spec(_parser().parse_args(["RUN", "--max-len", "200", "--synthetic-entities", "7"]), run)
    assert (spec.max_len, spec.buckets, spec.synthetic_entities, spec.forget_split) == (200, (64, 128, 200), 7, "forget05")
    with pytest.raises(ConfigError, match="benchmark"):
        data_spec(_parser().parse_args(["RUN", "--benchmark", "nope"]), run)
    # the run configuration's own keys, as every command takes them; options win over them
    args = _parser().parse_intermixed_args(["RUN", "data.max_len=128", "--synthetic-seed", "3", "data.synthetic_seed=2"])
    spec = data_spec(args, run)
    assert (spec.max_len, spec.buckets, spec.synthetic_seed) == (128, (64, 128), 3)
    spec = data_spec(_parser().parse_intermixed_args(["RUN", "data.max_len=128", "data.buckets=[128]"]), run)
    assert spec.buckets == (128,)
    with pytest.raises(ConfigError, match="data.KEY=VALUE and eval.KEY=VALUE overrides only"):
        data_spec(_parser().parse_intermixed_args(["RUN", "train.lr=1"]), run)


def test_eval_section_of_the_run_config_sets_what_eval_computes():
    """eval.max_new_tokens / batch_size / mia come from the run's eval section, then eval.KEY=VALUE, then options."""
    from jaxunlearn.config import ConfigError, EvalSpec, load_config
    from jaxunlearn.evals.cli import _parser, apply_eval_spec, data_spec

    run_eval = load_config(None, ["eval.max_new_tokens=32", "eval.mia=false"]).eval
    assert run_eval == EvalSpec(max_new_tokens=32, batch_size=16, mia=False)
    args = _parser().parse_args(["RUN"])
    apply_eval_spec(args, run_eval)
    assert (args.max_new_tokens, args.batch_size, args.no_mia) == (32, 16, True)
    args = _parser().parse_intermixed_args(["RUN", "eval.batch_size=8", "--max-new-tokens", "64", "eval.mia=true"])
    apply_eval_spec(args, run_eval)
    assert (args.max_new_tokens, args.batch_size, args.no_mia) == (64, 8, False)
    assert data_spec(args, load_config().data) == load_config().data  # eval keys leave the data settings alone
    args = _parser().parse_args(["RUN", "--no-mia"])
    apply_eval_spec(args, EvalSpec())
    assert args.no_mia is True and args.max_new_tokens == 200
    with pytest.raises(ConfigError, match="max_new_tokens and batch_size must be >= 1"):
        apply_eval_spec(_parser().parse_intermixed_args(["RUN", "eval.batch_size=0"]), EvalSpec())


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main_cli.main(["eval", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run directory" in err[0]
    (tmp_path / "empty").mkdir()
    assert main_cli.main(["eval", str(tmp_path / "empty")]) == 1
    assert "neither a run directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def wide_ev(ev):
    """ev with rows wide enough for a question and two or more of its answers (shared contexts)."""
    return dataclasses.replace(ev, buckets=(128,), _fns={})


def _shared_question_pairs(bench):
    return [(r["question"], a) for r in bench.retain_perturbed[:3]
            for a in [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]]


def test_shared_contexts_eight_devices_equal_one(wide_ev, model, tok, bench):
    """Rows with shared questions ([B, T, T] visibility masks) split over a data x fsdp mesh score the same."""
    graphdef, params = split_params(model)
    ev8 = Evaluator.create(graphdef, params, model.config, tok, prompt_format_for(tok, "qa"),
                           mesh=make_mesh(data=4, fsdp=2), batch_size=8, buckets=(128,), max_len=64)
    from jaxunlearn.evals.scoring import plan_rows

    pairs = _shared_question_pairs(bench)
    assert any(p.context for row in plan_rows([ev8.encode_qa(q, a) for q, a in pairs], 128) for p in row)
    for a, b in zip(wide_ev.score_qa(pairs), ev8.score_qa(pairs)):
        np.testing.assert_allclose(a.logp, b.logp, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a.match, b.match)


def test_real_model_batched_equals_unbatched(ev, wide_ev, bench):
    """jaxunlearn.models scoring: batch of 8 (with fill rows) == one example at a time, and the packed rows
    (several examples per row, each attending only to itself and to the question it shares with others: a
    retain row's perturbed answers) == each example alone in a padded row."""
    from jaxunlearn.evals.scoring import plan_rows
    from jaxunlearn.models import make_apply
    from jaxunlearn.ops import IGNORE

    pairs = [(r["question"], r["answer"]) for r in bench.forget_perturbed] + \
            [(r["question"], p) for r in bench.retain_perturbed[:1] for p in r["perturbed_answer"]]
    batched = ev.score_qa(pairs)
    single = dataclasses.replace(ev, batch_size=1, _fns={}).score_qa(pairs)
    examples = [ev.encode_qa(q, a) for q, a in pairs]
    assert any(p.context for row in plan_rows(examples, 128) for p in row)
    shared = wide_ev.score_qa(pairs)
    width = BUCKETS[0]
    ids = np.full((len(examples), width), ev.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])], mask[i, :len(e["input_ids"])] = e["input_ids"], 1
    logp = jax.nn.log_softmax(jax.jit(make_apply(ev.graphdef))(ev.params, ids, mask), axis=-1)
    for i, (a, b, c, e) in enumerate(zip(batched, single, shared, examples)):
        for other in (b, c):
            np.testing.assert_allclose(a.logp, other.logp, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(a.z, other.z, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(a.match, other.match)
        scored = [t for t in range(len(e["labels"]) - 1) if e["labels"][t + 1] != IGNORE]
        alone = np.asarray(logp[i, scored, np.array(e["labels"])[np.array(scored) + 1]])
        np.testing.assert_allclose(a.logp, alone, rtol=1e-5, atol=1e-5)


def test_splits_evaluated_together_equal_one_at_a_time(ev, bench):
    """evaluate_splits batches every split's answers and questions together: same records as split by split."""
    splits = {"forget": bench.forget_perturbed, "real_authors": bench.extra_evals["real_authors"]}
    together = evaluate_splits(ev, splits, N_NEW)
    for name, rows in splits.items():
        summary, records = evaluate_split(ev, rows, name, N_NEW)
        assert together[name][0] == pytest.approx(summary, rel=1e-5, abs=1e-6)
        for a, b in zip(together[name][1], records):
            assert a["generation"] == b["generation"]
            assert a["mean_nll"] == pytest.approx(b["mean_nll"], rel=1e-5)
            assert a["perturbed_mean_nll"] == pytest.approx(b["perturbed_mean_nll"], rel=1e-5)


def test_one_generation_program_per_call(model, tok):
    """Prompts of two buckets in one generate call are left-padded to one width: one compiled program."""
    graphdef, params = split_params(model)
    ev = Evaluator.create(graphdef, params, model.config, tok, batch_size=2, buckets=(8, 16), max_len=16)
    prompts = [[5] * 3, [6] * 4, [7] * 12]  # buckets 8, 8 and 16, in two batches
    out = ev.generate_ids(prompts, 2)
    assert [len(o) <= 2 for o in out] == [True] * 3
    assert ev._gen_fn(2)._cache_size() == 1


def test_prompt_longer_than_max_len_is_a_clear_error(ev):
    with pytest.raises(ValueError, match="no scored token"):
        dataclasses.replace(ev, max_len=4).score_qa([("a long question " * 4, "an answer")])


def test_cli_on_hf_folder(tmp_path, capsys):
    from jaxunlearn.models import export_hf

    bench = synthetic_benchmark(seed=0, n_entities=5)
    tok = synthetic_tokenizer(bench)
    cfg = ModelConfig.preset("tiny-llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = tmp_path / "hf"
    export_hf(init_model(cfg, seed=2), folder)
    tok.save_pretrained(folder)
    out = tmp_path / "out"
    rc = main_cli.main(["eval", str(folder), "--benchmark", "synthetic", "--synthetic-entities", "5", "--max-new-tokens", "4",
                   "--max-len", "64", "--batch-size", "8", "--mesh-data", "1", "--no-mia", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "hf.summary.json").read_text())
    assert s["benchmark"] == bench.name and s["sizes"]["forget"] == len(bench.forget_perturbed)
    per = json.loads((out / "hf.per_sample.json").read_text())
    assert len(per["retain"]) == len(bench.retain_perturbed)
    assert "| hf |" in (out / "results.md").read_text()


def test_cli_hf_folder_tokenizer_larger_than_vocab_is_an_error(tmp_path, capsys):
    # ids past the embedding would be clamped silently by the gather: refuse instead
    from jaxunlearn.models import export_hf

    bench = synthetic_benchmark(seed=0, n_entities=5)
    tok = synthetic_tokenizer(bench)
    folder = tmp_path / "hf"
    export_hf(init_model(ModelConfig.preset("tiny-llama", vocab_size=len(tok) // 2), seed=2), folder)
    tok.save_pretrained(folder)
    rc = main_cli.main(["eval", str(folder), "--benchmark", "synthetic", "--synthetic-entities", "5", "--max-new-tokens", "2",
                   "--max-len", "64", "--batch-size", "8", "--mesh-data", "1", "--no-mia", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "vocab_size" in err and len(err.strip().splitlines()) == 1


def test_contexts_not_shared_when_a_sliding_window_is_shorter_than_a_row(ev):
    """A sliding window counts row slots, and a shared question sits further back in a row than in its
    example alone: with a window shorter than the row width every example is laid out alone."""
    import types

    examples = [ev.encode_qa("Who?", "Someone.")]
    windowed = dataclasses.replace(ev, model_config=types.SimpleNamespace(layer_windows=(None, 8)))
    wide = dataclasses.replace(ev, model_config=types.SimpleNamespace(layer_windows=(None, 64)))
    assert ev._shares_contexts(examples, BUCKETS) and wide._shares_contexts(examples, BUCKETS)
    assert not windowed._shares_contexts(examples, BUCKETS)
