"""Membership-inference scores, ROC AUC, PrivLeak and memorisation metrics (pure numpy).

Per-sample inputs are 1-D arrays over the sample's scored (answer) tokens only: `logp` the
teacher-forced log-probability of each label token, `z` the Min-K%++ standardised log-prob
(log p(x_t) - mu_t) / sigma_t, `match` whether the teacher-forced argmax equals the label.

Which tokens (open-unlearning, src/evals/metrics/utils.py `tokenwise_logprobs`): Min-K%, Min-K%++,
exact memorisation and extraction strength drop the LAST labelled position of each sample
(`without_last`), whatever token it is: the EOS that ends a QA answer, or the last text token of a
MUSE PrivLeak text (which carries no EOS there). LOSS and ZLib use every labelled token, EOS
included (`evaluate_probability`).

Every MIA score here is "loss-like": a higher score means the sample looks LESS like a training
member. This is the convention of open-unlearning's attacks (LOSS, ZLib, Min-K%, Min-K%++), where
the score is fed to roc_auc_score with forget samples labelled 0 and holdout samples labelled 1.

Two AUC conventions:
- `mia_auc` (open-unlearning's MIA metrics, our TOFU `mia` block): AUC = P(score(holdout) >
  score(forget)) + 1/2 P(tie). 1.0 = the forget set is perfectly recognised as members (memorised).
- `privleak_auc` (MUSE, metrics/privleak.py: roc_curve(labels, -score) with holdout labelled 1;
  open-unlearning's privleak handler converts with 1 - AUC): AUC = 1 - mia_auc. A model that
  memorised the forget set scores near 0; a retrained model near 0.5 (MUSE publishes 0.4772 for
  News and 0.5393 for Books, `MUSE_RETRAIN_AUC`).

PrivLeak (`priv_leak`) = (AUC_unlearned - AUC_retrained) / AUC_retrained * 100 on privleak_auc with
Min-K% (k = 0.4) scores, as MUSE's eval.py and open-unlearning compute it. Sign: negative = the
model still treats the forget set as members (under-unlearning; about -100 for a model that
unlearned nothing), positive = it treats them as less member-like than a retrained model does
(over-unlearning); 0 is ideal.
"""

from __future__ import annotations

import zlib

import numpy as np

MIN_K_FRACTION = 0.4

# MUSE's retrained models' Min-40% forget-vs-holdout AUC (privleak_auc convention): muse_bench
# constants.py AUC_RETRAIN[corpus]["forget_holdout_Min-40%"], rounded to the 4 digits MUSE measured.
MUSE_RETRAIN_AUC = {"news": 0.4772, "books": 0.5393}


def _tokens(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array of per-token values, got shape {arr.shape}")
    return arr


def without_last(values) -> np.ndarray:
    """Per-token values without the sample's last labelled token (open-unlearning's `[:-1]`)."""
    return np.asarray(values)[:-1]


def loss_score(logp) -> float:
    """LOSS attack: mean NLL over the scored tokens."""
    return float(-_tokens(logp, "logp").mean())


def zlib_score(logp, text: str) -> float:
    """ZLib attack: mean NLL divided by the zlib-compressed byte length of the text."""
    return loss_score(logp) / len(zlib.compress(text.encode("utf-8")))


def _lowest_k_mean(values: np.ndarray, k: float) -> float:
    # open-unlearning / Min-K% code: keep max(1, int(n * k)) lowest values (int truncates).
    n_keep = max(1, int(values.size * k))
    return float(np.sort(values)[:n_keep].mean())


def min_k_score(logp, k: float = MIN_K_FRACTION) -> float:
    """Min-K%: negated mean of the lowest k fraction of token log-probs."""
    return -_lowest_k_mean(_tokens(logp, "logp"), k)


def min_k_pp_score(z, k: float = MIN_K_FRACTION) -> float:
    """Min-K%++: negated mean of the lowest k fraction of standardised log-probs z_t."""
    return -_lowest_k_mean(_tokens(z, "z"), k)


def roc_auc(negatives, positives) -> float:
    """Area under the ROC curve for 'higher score = positive': P(pos > neg) + P(pos == neg) / 2.

    Computed from average ranks (Mann-Whitney U), O(n log n); ties count 1/2.
    """
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError(f"roc_auc: need both classes, got {neg.size} negatives and {pos.size} positives")
    if not (np.all(np.isfinite(neg)) and np.all(np.isfinite(pos))):
        raise ValueError("roc_auc: scores must be finite")
    allv = np.concatenate([neg, pos])
    order = np.argsort(allv, kind="mergesort")
    sorted_v = allv[order]
    ranks = np.empty(allv.size, dtype=np.float64)
    # average 1-based rank within each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], allv.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def mia_auc(forget_scores, holdout_scores) -> float:
    """open-unlearning's AUC of a loss-like MIA score, holdout (non-trained) the positive class."""
    return roc_auc(forget_scores, holdout_scores)


def privleak_auc(forget_scores, holdout_scores) -> float:
    """MUSE's AUC: P(score(holdout) < score(forget)) + 1/2 P(tie) = 1 - mia_auc (see module docstring)."""
    return 1.0 - mia_auc(forget_scores, holdout_scores)


def priv_leak(auc_unlearned: float, auc_retrained: float) -> float:
    """MUSE PrivLeak in percent: (AUC_unlearned - AUC_retrained) / AUC_retrained * 100, privleak_auc AUCs."""
    if not auc_retrained > 0:
        raise ValueError(f"priv_leak: retrained-model AUC must be > 0, got {auc_retrained}")
    return float((auc_unlearned - auc_retrained) / auc_retrained * 100.0)


def exact_memorisation(match) -> float:
    """Fraction of answer tokens whose teacher-forced argmax equals the label."""
    return float(_tokens(match, "match").mean())


def extraction_strength(match) -> float:
    """1 - k*/|y|, k* the smallest prefix length after which every teacher-forced argmax is right.

    Matches open-unlearning's loop over k in range(|y|): when not even the last token is right,
    the loop ends at k = |y| - 1, so the score is 1/|y| rather than 0.
    """
    m = _tokens(match, "match").astype(bool)
    n = m.size
    # suffix_ok[k] = all(m[k:]); the smallest such k in [0, n-1], else n - 1.
    suffix_ok = np.flip(np.cumprod(np.flip(m)).astype(bool))
    hits = np.flatnonzero(suffix_ok)
    k_star = int(hits[0]) if hits.size else n - 1
    return 1.0 - k_star / n
