"""MUSE evaluation of one model on a `jaxunlearn.data.MuseBenchmark`.

- VerbMem(forget): greedy continuation (128 new tokens) of each verbmem prompt, ROUGE-L F1 against
  the true continuation cut to its first 128 tokens.
- KnowMem(forget / retain): few-shot "Question: ...\\nAnswer: ...\\n\\n" prompt
  (`jaxunlearn.data.knowmem_prompt`), 32 greedy tokens, output cut at a blank line or "Question"
  (MUSE's stop list), ROUGE-L F1 against the answer.
- PrivLeak: Min-K% (k = 0.4) AUC of privleak forget (trained on) vs holdout texts (`jaxunlearn.evals.mia`
  for the sign convention), relative to a retrained model's AUC given as `retrain_auc`; None without it.

MUSE tokenises prompts with the tokenizer's special tokens (BOS where it adds one); so do we.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxunlearn.evals import metrics as M
from jaxunlearn.evals import mia

VERBMEM_NEW_TOKENS = 128
KNOWMEM_NEW_TOKENS = 32


def _prompt_ids(tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]


def verbmem(ev, rows: Sequence[dict], max_new_tokens: int = VERBMEM_NEW_TOKENS) -> tuple[float, list[dict]]:
    """Mean ROUGE-L F1 of continuations vs the true continuation (cut to max_new_tokens tokens)."""
    tok = ev.tokenizer
    outs = ev.generate_texts([_prompt_ids(tok, r["prompt"]) for r in rows], max_new_tokens)
    records = []
    for r, out in zip(rows, outs):
        gt_ids = tok(r["gt"], add_special_tokens=False)["input_ids"][:max_new_tokens]
        gt = tok.decode(gt_ids, skip_special_tokens=True)
        records.append({"prompt": r["prompt"], "gt": gt, "output": out, "rougeL_f1": M.rouge_l_f1(out, gt)})
    return float(np.mean([x["rougeL_f1"] for x in records])), records


def knowmem(ev, rows: Sequence[dict], icl: Sequence[dict], max_new_tokens: int = KNOWMEM_NEW_TOKENS) -> tuple[float, list[dict]]:
    """Mean ROUGE-L F1 of few-shot answers vs the reference answers."""
    from jaxunlearn.data import knowmem_prompt

    prompts = [_prompt_ids(ev.tokenizer, knowmem_prompt(list(icl), r["question"])) for r in rows]
    outs = ev.generate_texts(prompts, max_new_tokens, stop_strings=M.KNOWMEM_STOPS)
    records = [{"question": r["question"], "answer": r["answer"], "output": o, "rougeL_f1": M.rouge_l_f1(o, r["answer"])}
               for r, o in zip(rows, outs)]
    return float(np.mean([x["rougeL_f1"] for x in records])), records


def min_k_auc(ev, forget_texts: Sequence[str], holdout_texts: Sequence[str]) -> float:
    """Min-K% (k = 0.4) AUC, forget texts vs holdout texts, every token scored."""
    f = [mia.min_k_score(s.logp) for s in ev.score_texts(forget_texts)]
    h = [mia.min_k_score(s.logp) for s in ev.score_texts(holdout_texts)]
    return mia.mia_auc(f, h)


def evaluate_muse(ev, bench, retrain_auc: float | None = None, model_name: str = "",
                  verbmem_tokens: int = VERBMEM_NEW_TOKENS, knowmem_tokens: int = KNOWMEM_NEW_TOKENS) -> tuple[dict, dict]:
    """(summary, per_sample) with VerbMem, KnowMem forget/retain, Min-K% AUC and PrivLeak."""
    summary: dict[str, Any] = {"model": model_name, "benchmark": bench.name, "sizes": {},
                               "verbmem_tokens": int(verbmem_tokens), "knowmem_tokens": int(knowmem_tokens)}
    per_sample: dict[str, Any] = {"model": model_name, "benchmark": bench.name}
    if bench.verbmem_forget:
        summary["verbmem_forget"], per_sample["verbmem_forget"] = verbmem(ev, bench.verbmem_forget, verbmem_tokens)
        summary["sizes"]["verbmem_forget"] = len(bench.verbmem_forget)
    for split, rows, icl in (("forget", bench.knowmem_forget, bench.knowmem_forget_icl),
                             ("retain", bench.knowmem_retain, bench.knowmem_retain_icl)):
        if rows:
            summary[f"knowmem_{split}"], per_sample[f"knowmem_{split}"] = knowmem(ev, rows, icl, knowmem_tokens)
            summary["sizes"][f"knowmem_{split}"] = len(rows)
    forget = bench.privleak.get("forget") if bench.privleak else None
    holdout = bench.privleak.get("holdout") if bench.privleak else None
    forget, holdout = forget or bench.forget, holdout or bench.holdout
    if forget and holdout:
        auc = min_k_auc(ev, forget, holdout)
        summary["min_k_auc"] = auc
        summary["retrain_min_k_auc"] = retrain_auc
        summary["priv_leak"] = None if retrain_auc is None else mia.priv_leak(auc, retrain_auc)
        summary["sizes"]["privleak_forget"], summary["sizes"]["privleak_holdout"] = len(forget), len(holdout)
    return summary, per_sample
