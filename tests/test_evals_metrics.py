"""Metric formulas against hand-computed values (no model)."""

import math
import zlib

import numpy as np
import pytest

from jaxunlearn.evals import metrics as M
from jaxunlearn.evals import mia


def test_probability_is_exp_of_minus_mean_nll():
    # NLLs of 2 answer tokens: 0.5 and 1.5 -> mean 1.0 -> P = e^-1
    assert M.probability([1.0])[0] == pytest.approx(math.exp(-1.0))


def test_truth_ratio_geometric_mean_over_perturbed():
    true = [1.0, 2.0]
    pert = [[2.0, 4.0], [1.0, 1.0]]  # means 3.0 and 1.0
    r = M.truth_ratio(true, pert)
    assert r[0] == pytest.approx(math.exp(1.0 - 3.0))
    assert r[1] == pytest.approx(math.exp(2.0 - 1.0))
    # same as P(false)/P(true) with P(false) the geometric mean of the perturbed probabilities
    p_true = math.exp(-1.0)
    p_false = math.sqrt(math.exp(-2.0) * math.exp(-4.0))
    assert r[0] == pytest.approx(p_false / p_true)


def test_truth_ratio_scores():
    r = np.array([0.5, 2.0, 1.0])
    # forget: min(R, 1/R) = 0.5, 0.5, 1 -> mean 2/3
    assert M.forget_truth_score(r) == pytest.approx(2.0 / 3.0)
    # retain: max(0, 1-R) = 0.5, 0, 0 -> mean 1/6
    assert M.retain_truth_score(r) == pytest.approx(1.0 / 6.0)


def test_normalised_probability():
    true = [math.log(2.0)]  # P = 0.5
    pert = [[math.log(4.0), math.log(4.0), math.log(8.0)]]  # 0.25 + 0.25 + 0.125
    assert M.normalised_probability(true, pert)[0] == pytest.approx(0.5 / (0.5 + 0.625))


def test_rouge_l_recall_and_f1_by_hand():
    # reference 4 tokens, prediction 2 tokens, LCS = 2
    assert M.rouge_l_recall("the cat", "the cat sat down") == pytest.approx(0.5)
    # F1 with P = 1, R = 0.5 -> 2/3
    assert M.rouge_l_f1("the cat", "the cat sat down") == pytest.approx(2.0 / 3.0)
    # stemming: "writes" ~ "writing" with the Porter stemmer (TOFU uses stemming)
    assert M.rouge_l_recall("she writes", "she writing") == pytest.approx(1.0)
    assert M.rouge_l_f1("she writes", "she writing") == pytest.approx(0.5)


def test_rouge_equals_rouge_score_stock_scorer():
    """The scorer with remembered stems gives rouge_score's own RougeScorer values, bit for bit."""
    from rouge_score import rouge_scorer

    rng = np.random.default_rng(0)
    words = ("The author's writing, in 1987, explored identities; she writes novels and wrote stories about "
             "running, runners, ran and caring carefully -- généalogie 42x").split()
    texts = [" ".join(rng.choice(words, size=rng.integers(0, 30))) for _ in range(60)]
    for stem in (True, False):
        stock = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
        for pred, ref in zip(texts[::2], texts[1::2]):
            assert M.rouge_l(pred, ref, use_stemmer=stem) == stock.score(ref, pred)["rougeL"]


def test_forget_quality_ks_and_undefined_without_retain():
    a = np.array([0.1, 0.2, 0.3, 0.4])
    assert M.forget_quality(a, None) is None
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    # disjoint samples of 4 vs 4: D = 1, exact two-sided p = 2 / C(8,4) = 2/70
    b = a + 10.0
    assert M.forget_quality(a, b) == pytest.approx(2.0 / 70.0)


def test_model_utility_harmonic_mean():
    vals = {k: 0.5 for k in M.UTILITY_KEYS}
    assert M.model_utility(vals) == pytest.approx(0.5)
    vals[M.UTILITY_KEYS[0]] = 1.0
    expected = 9.0 / (1.0 / 1.0 + 8.0 / 0.5)
    assert M.model_utility(vals) == pytest.approx(expected)
    vals[M.UTILITY_KEYS[1]] = 0.0
    assert M.model_utility(vals) == 0.0
    with pytest.raises(ValueError, match="missing values for retain/prob"):
        M.model_utility({})


def test_knowmem_cut():
    assert M.cut_at("Paris\n\nQuestion: x", M.KNOWMEM_STOPS) == "Paris"
    assert M.cut_at("Paris Question: next", M.KNOWMEM_STOPS) == "Paris "
    assert M.cut_at("Paris", M.KNOWMEM_STOPS) == "Paris"


def test_mia_scores_by_hand():
    logp = np.log(np.array([0.5, 0.25, 0.125, 1.0, 0.5]))
    assert mia.loss_score(logp) == pytest.approx(-logp.mean())
    text = "hello hello hello"
    assert mia.zlib_score(logp, text) == pytest.approx(-logp.mean() / len(zlib.compress(text.encode())))
    # k = 0.4 of 5 tokens -> the 2 lowest log-probs: log .125, log .25
    assert mia.min_k_score(logp) == pytest.approx(-(math.log(0.125) + math.log(0.25)) / 2)
    # fewer than 1/k tokens -> keep one
    assert mia.min_k_score(logp[:2]) == pytest.approx(-math.log(0.25))
    z = np.array([1.0, -2.0, 0.5, -1.0, 3.0])
    assert mia.min_k_pp_score(z) == pytest.approx(1.5)


def _brute_auc(neg, pos):
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(neg) * len(pos))


def test_roc_auc_matches_pair_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        neg = rng.integers(0, 6, size=rng.integers(1, 15)).astype(float)
        pos = rng.integers(0, 6, size=rng.integers(1, 15)).astype(float)
        assert mia.roc_auc(neg, pos) == pytest.approx(_brute_auc(neg, pos))
    assert mia.roc_auc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert mia.roc_auc([1.0, 1.0], [1.0]) == 0.5


def test_mia_auc_orientation_and_priv_leak():
    # memorised forget set: low loss on forget, high on holdout -> open-unlearning AUC 1, MUSE AUC 0
    assert mia.mia_auc([0.1, 0.2], [1.0, 2.0]) == 1.0
    assert mia.privleak_auc([0.1, 0.2], [1.0, 2.0]) == 0.0
    assert mia.priv_leak(0.75, 0.5) == pytest.approx(50.0)
    assert mia.priv_leak(0.25, 0.5) == pytest.approx(-50.0)


def test_privleak_auc_is_muses_roc_auc():
    # MUSE metrics/privleak.py: roc_curve(y, -score), forget labelled 0, holdout 1 -> AUC of the negated scores
    rng = np.random.default_rng(1)
    for _ in range(10):
        f = rng.integers(0, 5, size=rng.integers(1, 9)).astype(float)
        h = rng.integers(0, 5, size=rng.integers(1, 9)).astype(float)
        assert mia.privleak_auc(f, h) == pytest.approx(_brute_auc(-f, -h))
        # open-unlearning's privleak handler: 1 - its roc_auc_score(labels, scores)
        assert mia.privleak_auc(f, h) == pytest.approx(1.0 - _brute_auc(f, h))


def test_priv_leak_by_hand():
    # Min-K scores forget [1, 3], holdout [2, 4]: of the 4 (holdout, forget) pairs only (2, 3) has
    # holdout < forget -> MUSE AUC 1/4; against a retrained AUC of 1/2: (0.25 - 0.5) / 0.5 * 100 = -50
    auc = mia.privleak_auc([1.0, 3.0], [2.0, 4.0])
    assert auc == pytest.approx(0.25)
    assert mia.priv_leak(auc, 0.5) == pytest.approx(-50.0)
    # open-unlearning: score = 1 - 0.75, ref = 1 - 0.5 -> the same
    assert ((1 - 0.75) - (1 - 0.5)) / (1 - 0.5) * 100 == pytest.approx(-50.0)


def test_priv_leak_of_a_model_that_unlearned_nothing_is_near_minus_100():
    # forget texts memorised (Min-K loss far below every holdout text's): MUSE AUC 0 -> PrivLeak -100
    # against MUSE's published retrained AUCs, as MUSE reports its original (target) models
    rng = np.random.default_rng(0)
    forget, holdout = rng.uniform(0.1, 0.5, 50), rng.uniform(2.0, 4.0, 50)
    auc = mia.privleak_auc(forget, holdout)
    for corpus in ("news", "books"):
        assert mia.priv_leak(auc, mia.MUSE_RETRAIN_AUC[corpus]) == pytest.approx(-100.0)
    # a retrained-like model (forget and holdout alike) scores near 0
    same = mia.privleak_auc(rng.uniform(1, 3, 400), rng.uniform(1, 3, 400))
    assert abs(mia.priv_leak(same, 0.5)) < 10


def test_min_k_and_memorisation_leave_out_the_last_label():
    # open-unlearning drops the last labelled position (EOS for a QA answer) before Min-K%, Min-K%++, EM, ES
    logp = np.log(np.array([0.5, 0.25, 0.125, 1.0, 0.5, 0.01]))  # last = EOS, the lowest
    # 5 tokens left, int(5 * 0.4) = 2 lowest: log .125, log .25 (the EOS's log .01 is not among them)
    assert mia.min_k_score(mia.without_last(logp)) == pytest.approx(-(math.log(0.125) + math.log(0.25)) / 2)
    z = np.array([1.0, -2.0, 0.5, -1.0, 3.0, -9.0])
    assert mia.min_k_pp_score(mia.without_last(z)) == pytest.approx(1.5)
    match = np.array([1, 0, 1, 1, 0])  # answer [1, 0, 1, 1], EOS wrong
    assert mia.exact_memorisation(mia.without_last(match)) == pytest.approx(0.75)
    assert mia.extraction_strength(mia.without_last(match)) == pytest.approx(0.5)


def test_memorisation_by_hand():
    m = np.array([1, 0, 1, 1])
    assert mia.exact_memorisation(m) == pytest.approx(0.75)
    # suffix from k=2 is all right -> 1 - 2/4
    assert mia.extraction_strength(m) == pytest.approx(0.5)
    assert mia.extraction_strength(np.ones(4)) == 1.0
    # last token wrong: open-unlearning's loop stops at k = n-1 -> 1/n
    assert mia.extraction_strength(np.array([1, 1, 0])) == pytest.approx(1.0 / 3.0)
