"""TOFU and MUSE metric formulas on per-sample numbers (pure numpy, no model).

Definitions follow ../shared/design/metrics.md (relative to the repository root). Inputs are
per-sample *mean* NLLs over the scored answer tokens (what the scorer in `jaxunlearn.evals.scoring`
returns), so a probability is length-normalised: P(a|q) = exp(-mean NLL).

Conventions (and where they come from):
- Truth ratio R = exp(mean_NLL(true) - mean_j mean_NLL(perturbed_j)) = P(false)/P(true), with the
  geometric mean over perturbed answers (the mean of their mean NLLs). The TOFU code stores the
  inverse, exp(perturbed - paraphrased), and scores retain sets by max(0, 1 - 1/that), which is
  max(0, 1 - R) here; open-unlearning stores R itself. Forget quality's KS test is run on R.
- ROUGE for TOFU: rouge_score rougeL with use_stemmer=True, recall, scorer.score(target=answer,
  prediction=generation) as in the TOFU evaluation code.
- ROUGE for MUSE (VerbMem / KnowMem): rougeL F1 (metrics.md; open-unlearning's MUSE configs use
  rougeL_f1). MUSE's own logger builds its scorer with use_stemmer=False, so that is the default here.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

# The nine values whose harmonic mean is TOFU's model utility.
UTILITY_KEYS = tuple(
    f"{split}/{metric}"
    for split in ("retain", "real_authors", "world_facts")
    for metric in ("prob", "rouge", "truth_ratio")
)


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of per-sample values, got shape {arr.shape}")
    return arr


def _as_2d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected [samples, perturbed answers], got shape {arr.shape}")
    return arr


def probability(mean_nll) -> np.ndarray:
    """Length-normalised answer probability per sample: exp(-mean NLL)."""
    return np.exp(-_as_1d(mean_nll, "mean_nll"))


def truth_ratio(true_mean_nll, perturbed_mean_nll) -> np.ndarray:
    """Per-sample R = exp(true NLL - mean_j perturbed_j NLL): false over true, geometric mean over j."""
    true = _as_1d(true_mean_nll, "true_mean_nll")
    pert = _as_2d(perturbed_mean_nll, "perturbed_mean_nll")
    if pert.shape[0] != true.shape[0]:
        raise ValueError(f"truth_ratio: {true.shape[0]} true answers but {pert.shape[0]} rows of perturbed answers")
    return np.exp(true - pert.mean(axis=1))


def forget_truth_score(ratios) -> float:
    """Forget-set truth-ratio score: mean of min(R, 1/R)."""
    r = _as_1d(ratios, "ratios")
    return float(np.mean(np.minimum(r, 1.0 / r)))


def retain_truth_score(ratios) -> float:
    """Retain / real_authors / world_facts truth-ratio score: mean of max(0, 1 - R)."""
    r = _as_1d(ratios, "ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def normalised_probability(true_mean_nll, perturbed_mean_nll) -> np.ndarray:
    """real_authors / world_facts per-sample P(a) / (P(a) + sum_j P(perturbed_j))."""
    p_true = probability(true_mean_nll)
    p_pert = np.exp(-_as_2d(perturbed_mean_nll, "perturbed_mean_nll"))
    if p_pert.shape[0] != p_true.shape[0]:
        raise ValueError(f"normalised_probability: {p_true.shape[0]} true answers but {p_pert.shape[0]} perturbed rows")
    return p_true / (p_true + p_pert.sum(axis=1))


class _RememberingStemmer:
    """A stemmer that remembers each word's stem (Porter stemming is a pure function of the word and took
    70% of rouge_score's time on TOFU answers, whose words repeat)."""

    def __init__(self, stemmer):
        self.stem = functools.lru_cache(maxsize=1 << 16)(stemmer.stem)


@functools.lru_cache(maxsize=4)
def _scorer(use_stemmer: bool):
    """rouge_score's rougeL scorer with its default tokenizer (lower case, non-alphanumerics split, Porter
    stems of words longer than 3 characters when use_stemmer), the stems remembered."""
    from nltk.stem import porter
    from rouge_score import rouge_scorer, tokenize, tokenizers

    stemmer = _RememberingStemmer(porter.PorterStemmer()) if use_stemmer else None

    class Tokenizer(tokenizers.Tokenizer):
        def tokenize(self, text):
            return tokenize.tokenize(text, stemmer)

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=Tokenizer())


def rouge_l(prediction: str, reference: str, use_stemmer: bool = True):
    """rouge_score's rougeL Score(precision, recall, fmeasure) of prediction against reference."""
    return _scorer(use_stemmer).score(reference, prediction)["rougeL"]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """TOFU ROUGE: rougeL recall with stemming."""
    return float(rouge_l(prediction, reference, use_stemmer=True).recall)


def rouge_l_f1(prediction: str, reference: str, use_stemmer: bool = False) -> float:
    """MUSE ROUGE: rougeL F1 (MUSE's scorer does not stem)."""
    return float(rouge_l(prediction, reference, use_stemmer=use_stemmer).fmeasure)


def forget_quality(ratios, retain_model_ratios) -> float | None:
    """KS-test p-value between the evaluated and the retain model's per-sample forget truth ratios.

    Returns None when the retain model's values are missing: forget quality is then undefined.
    """
    if retain_model_ratios is None:
        return None
    ours = _as_1d(ratios, "ratios")
    theirs = _as_1d(retain_model_ratios, "retain_model_ratios")
    if ours.size == 0 or theirs.size == 0:
        return None
    return float(stats.ks_2samp(ours, theirs).pvalue)


def model_utility(values: Mapping[str, float]) -> float:
    """Harmonic mean of the nine TOFU utility values (keys: UTILITY_KEYS)."""
    missing = [k for k in UTILITY_KEYS if k not in values or values[k] is None]
    if missing:
        raise ValueError(f"model_utility: missing values for {', '.join(missing)}")
    vals = np.array([float(values[k]) for k in UTILITY_KEYS])
    if np.any(vals < 0) or not np.all(np.isfinite(vals)):
        raise ValueError(f"model_utility: values must be finite and >= 0, got {dict(zip(UTILITY_KEYS, vals))}")
    if np.any(vals == 0):
        return 0.0  # the harmonic mean's limit; scipy warns on zeros
    return float(stats.hmean(vals))


def cut_at(text: str, stops: Sequence[str]) -> str:
    """The part of text before the first occurrence of any stop string (applied in order, as MUSE does)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


# MUSE KnowMem cuts the answer at a blank line or a new question.
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")
