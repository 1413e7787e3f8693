"""TOFU evaluation of one model on an UnlearnBenchmark (TOFU itself or the synthetic benchmark).

Splits evaluated (whole splits; older TOFU code used only the first 300 rows, we record sizes):
  forget        bench.forget_perturbed: probability of the answer, truth ratio (paraphrased answer
                vs perturbed answers), ROUGE-L recall of the greedy answer, exact memorisation and
                extraction strength of the answer without its EOS (as open-unlearning)
  retain        bench.retain_perturbed: the same, truth-ratio score max(0, 1 - R)
  real_authors, world_facts (bench.extra_evals): normalised probability P(a)/(P(a) + sum P(perturbed)),
                truth ratio of the answer itself vs the perturbed answers, ROUGE-L recall
  mia           forget vs holdout (question, answer) rows: LOSS, ZLib, Min-K%, Min-K%++ AUC

Forget quality needs the retain model's per-sample forget truth ratios (`retain_ratios`, e.g. from
the retain model's per-sample JSON: `load_forget_ratios`); without them it is None (undefined).
Model utility is the harmonic mean of the nine retain / real_authors / world_facts values.

As in the TOFU code, every answer is scored as in a forward pass of its own with its question (the
question's tokens are computed once for all of its answers, each answer attending only to its question
and itself: `jaxunlearn.evals.scoring`), and a sample's loss is the mean NLL over its answer tokens plus
EOS (`jaxunlearn.data.encode_qa`).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Sequence

import numpy as np

from jaxunlearn.errors import JaxunlearnError
from jaxunlearn.evals import metrics as M
from jaxunlearn.evals import mia
from jaxunlearn.evals.scoring import SampleScore
from jaxunlearn.ops import IGNORE

SPLIT_SOURCES = {"forget": "forget_perturbed", "retain": "retain_perturbed"}
EXTRA_SPLITS = ("real_authors", "world_facts")
TOFU_MAX_NEW_TOKENS = 200


class EvalError(JaxunlearnError, ValueError):
    """Bad evaluation input (a row without perturbed answers, an unreadable results file, ...)."""


def _perturbed(rows: Sequence[dict], split: str) -> list[list[str]]:
    out = []
    for i, r in enumerate(rows):
        pert = r.get("perturbed_answer")
        if not isinstance(pert, list) or not pert:
            raise EvalError(f"{split} row {i}: 'perturbed_answer' must be a non-empty list")
        out.append([str(p) for p in pert])
    if len({len(p) for p in out}) > 1:
        raise EvalError(f"{split}: rows have different numbers of perturbed answers "
                        f"({sorted({len(p) for p in out})}); the truth ratio needs the same count per row")
    return out


def _mean_nll(scores: Sequence[SampleScore]) -> np.ndarray:
    return np.array([s.mean_nll for s in scores], dtype=np.float64)


def _split_pairs(rows: Sequence[dict], split: str) -> dict[str, list[tuple[str, str]]]:
    """The (question, answer) pairs one split scores: the answers, the paraphrased answers (forget and
    retain only) and every perturbed answer (row-major)."""
    if not rows:
        raise EvalError(f"{split}: no rows to evaluate")
    perturbed = _perturbed(rows, split)
    pairs = {"gt": [(r["question"], r["answer"]) for r in rows]}
    if split in SPLIT_SOURCES:
        missing = [i for i, r in enumerate(rows) if not r.get("paraphrased_answer")]
        if missing:
            raise EvalError(f"{split} row {missing[0]}: missing 'paraphrased_answer'")
        pairs["paraphrased"] = [(r["question"], r["paraphrased_answer"]) for r in rows]
    pairs["perturbed"] = [(r["question"], p) for r, ps in zip(rows, perturbed) for p in ps]
    return pairs


def evaluate_splits(ev, splits: dict[str, Sequence[dict]],
                    max_new_tokens: int = TOFU_MAX_NEW_TOKENS) -> dict[str, tuple[dict, list[dict]]]:
    """{split: (summary, per-sample records)} for TOFU splits (forget / retain / an extra eval).

    Every answer of every split is scored in one `score_qa` call and every question answered in one
    `generate_answers` call, so that batches are filled across splits, sorted by length over all of
    them, and share a few padded shapes (one compiled program per shape)."""
    plan = {name: _split_pairs(rows, name) for name, rows in splits.items()}
    flat = [pair for pairs in plan.values() for kind in pairs.values() for pair in kind]
    scores = iter(ev.score_qa(flat))
    scored = {name: {kind: [next(scores) for _ in pairs[kind]] for kind in pairs} for name, pairs in plan.items()}
    questions = [r["question"] for rows in splits.values() for r in rows]
    answers = iter(ev.generate_answers(questions, max_new_tokens))
    return {name: _summarise(rows, name, scored[name], [next(answers) for _ in rows])
            for name, rows in splits.items()}


def evaluate_split(ev, rows: Sequence[dict], split: str, max_new_tokens: int = TOFU_MAX_NEW_TOKENS) -> tuple[dict, list[dict]]:
    """(summary, per-sample records) of one TOFU split; split in forget / retain / an extra eval."""
    return evaluate_splits(ev, {split: rows}, max_new_tokens)[split]


def _summarise(rows: Sequence[dict], split: str, scored: dict[str, list[SampleScore]],
               generations: Sequence[str]) -> tuple[dict, list[dict]]:
    """(summary, records) of one split from its teacher-forced scores and greedy answers."""
    is_extra = split not in SPLIT_SOURCES
    gt = scored["gt"]
    gt_nll = _mean_nll(gt)
    pert_nll = _mean_nll(scored["perturbed"]).reshape(len(rows), -1)
    if is_extra:
        true_nll = gt_nll
        prob = M.normalised_probability(gt_nll, pert_nll)
    else:
        true_nll = _mean_nll(scored["paraphrased"])
        prob = M.probability(gt_nll)
    ratios = M.truth_ratio(true_nll, pert_nll)
    rouge = np.array([M.rouge_l_recall(g, r["answer"]) for g, r in zip(generations, rows)])
    tr_score = M.forget_truth_score(ratios) if split == "forget" else M.retain_truth_score(ratios)

    summary = {"n": len(rows), "prob": float(prob.mean()), "rouge": float(rouge.mean()), "truth_ratio": tr_score}
    records = []
    for i, r in enumerate(rows):
        rec = {"index": i, "question": r["question"], "answer": r["answer"], "generation": generations[i],
               "mean_nll": float(gt_nll[i]), "prob": float(prob[i]), "true_mean_nll": float(true_nll[i]),
               "perturbed_mean_nll": pert_nll[i].tolist(), "truth_ratio": float(ratios[i]),
               "rouge_recall": float(rouge[i])}
        if not is_extra:
            rec["exact_memorisation"] = mia.exact_memorisation(mia.without_last(gt[i].match))
            rec["extraction_strength"] = mia.extraction_strength(mia.without_last(gt[i].match))
        records.append(rec)
    if not is_extra:
        summary["exact_memorisation"] = float(np.mean([r["exact_memorisation"] for r in records]))
        summary["extraction_strength"] = float(np.mean([r["extraction_strength"] for r in records]))
    return summary, records


def answer_text(tokenizer, example: dict) -> str:
    """The scored tokens of an encoded example decoded without special tokens (the answer without EOS):
    the text open-unlearning's ZLib attack compresses (`extract_target_texts_from_processed_data`)."""
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE], skip_special_tokens=True)


def mia_scores(ev, rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-sample LOSS, ZLib, Min-K% and Min-K%++ (k = 0.4) scores of QA rows, as open-unlearning computes them.

    LOSS and ZLib use every answer token and EOS; ZLib divides by the compressed length of the
    decoded answer (`answer_text`); Min-K% and Min-K%++ leave out the last token, EOS (`mia.without_last`).
    """
    examples = [ev.encode_qa(r["question"], r["answer"]) for r in rows]
    scores = ev.score_examples(examples)
    return {
        "loss": np.array([mia.loss_score(s.logp) for s in scores]),
        "zlib": np.array([mia.zlib_score(s.logp, answer_text(ev.tokenizer, e)) for s, e in zip(scores, examples)]),
        "min_k": np.array([mia.min_k_score(mia.without_last(s.logp)) for s in scores]),
        "min_k_pp": np.array([mia.min_k_pp_score(mia.without_last(s.z)) for s in scores]),
    }


def evaluate_mia(ev, forget_rows: Sequence[dict], holdout_rows: Sequence[dict]) -> dict[str, float]:
    """AUC of each attack separating forget (trained on) from holdout (never trained on)."""
    f, h = mia_scores(ev, forget_rows), mia_scores(ev, holdout_rows)
    return {f"{name}_auc": mia.mia_auc(f[name], h[name]) for name in f}


def evaluate_tofu(ev, bench, retain_ratios=None, max_new_tokens: int = TOFU_MAX_NEW_TOKENS,
                  model_name: str = "", with_mia: bool = True) -> tuple[dict, dict]:
    """(summary, per_sample) for one model. Both are JSON-ready dicts."""
    if retain_ratios is not None and len(retain_ratios) != len(bench.forget_perturbed):
        raise EvalError(f"retain-model results have {len(retain_ratios)} forget truth ratios but this forget split "
                        f"has {len(bench.forget_perturbed)} rows; evaluate the retain model on the same forget split")
    identity = benchmark_identity(bench)
    summary: dict[str, Any] = {"model": model_name, "benchmark": bench.name, "benchmark_identity": identity,
                               "sizes": {}, "whole_splits": True, "max_new_tokens": int(max_new_tokens)}
    per_sample: dict[str, Any] = {"model": model_name, "benchmark": bench.name, "benchmark_identity": identity}
    plan = {name: getattr(bench, src) for name, src in SPLIT_SOURCES.items()}
    plan.update((name, bench.extra_evals[name]) for name in EXTRA_SPLITS if bench.extra_evals.get(name))
    for name, (split_summary, records) in evaluate_splits(ev, plan, max_new_tokens).items():
        summary[name], per_sample[name] = split_summary, records
        summary["sizes"][name] = len(plan[name])
    forget_r = [r["truth_ratio"] for r in per_sample["forget"]]
    summary["forget_quality"] = M.forget_quality(forget_r, retain_ratios)
    utility = {f"{s}/{m}": summary[s][m] for s in ("retain",) + EXTRA_SPLITS if s in summary
               for m in ("prob", "rouge", "truth_ratio")}
    summary["model_utility"] = M.model_utility(utility) if len(utility) == len(M.UTILITY_KEYS) else None
    if with_mia and bench.holdout:
        summary["mia"] = evaluate_mia(ev, bench.forget, bench.holdout)
        summary["sizes"]["mia_forget"], summary["sizes"]["mia_holdout"] = len(bench.forget), len(bench.holdout)
    return summary, per_sample


def benchmark_identity(bench) -> dict[str, Any]:
    """What a result was computed on: the benchmark's name (TOFU: tofu-<forget split>; synthetic:
    synthetic-s<seed>-e<entities>-f<forget entities>; MUSE: muse-<corpus>), its row counts, and a
    SHA-256 prefix of the forget rows (so that results on differently built data never compare)."""
    rows = getattr(bench, "forget_perturbed", None) or getattr(bench, "forget", [])
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    sizes = bench.sizes() if hasattr(bench, "sizes") else {}
    return {"name": bench.name, "rows": sizes, "forget_sha256": digest[:16]}


def _describe(identity: dict) -> str:
    forget = (identity.get("rows") or {}).get("forget_perturbed", "?")
    return f"{identity.get('name')} ({forget} forget rows, forget data {identity.get('forget_sha256')})"


def load_forget_ratios(path: str | pathlib.Path, identity: dict | None = None) -> list[float]:
    """Per-sample forget truth ratios from a per-sample JSON written by `evaluate_tofu` / `jaxunlearn eval`.

    With `identity` (this evaluation's `benchmark_identity`), a file computed on another benchmark,
    split, seed or row set is refused (EvalError naming both), as is one that records no identity.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: retain-model results file not found")
    try:
        data = json.loads(p.read_text())
        ratios = [float(r["truth_ratio"]) for r in data["forget"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise EvalError(f"{p}: not a per-sample results file with forget truth ratios ({e})") from None
    theirs = data.get("benchmark_identity")
    if identity is not None and theirs != identity:
        if not isinstance(theirs, dict):
            raise EvalError(f"{p}: records no benchmark identity; "
                            f"re-evaluate the retain model on {_describe(identity)}")
        raise EvalError(f"{p}: retain-model results are for {_describe(theirs)}, "
                        f"but this evaluation is on {_describe(identity)}")
    return ratios


def evaluate_for_cli(ev, bench, options, label: str) -> tuple[dict, dict]:
    """The TOFU-style evaluation as registered in jaxunlearn.data.benchmarks: options.retain_results (a
    retain model's per-sample file, for forget quality), options.max_new_tokens, options.no_mia."""
    retain = load_forget_ratios(options.retain_results, benchmark_identity(bench)) if options.retain_results else None
    return evaluate_tofu(ev, bench, retain, options.max_new_tokens, label, with_mia=not options.no_mia)
