"""MUSE (Shi et al., 2024): News and Books, from the hub or a local folder.

Hub ids: muse-bench/MUSE-News and muse-bench/MUSE-Books, read as
`datasets.load_dataset(repo, subset, split=split)`. Subsets, splits and fields used here
(as published on the hub):
  raw       forget, retain1, retain2, holdout             text
  verbmem   forget                                        prompt, gt
  knowmem   forget_qa, retain_qa, forget_qa_icl, retain_qa_icl   question, answer
  privleak  forget, retain, holdout                       text
retain1 is the retain set used while unlearning; retain2 is the retain text used for evaluation.

A local folder mirrors the hub's layout: `<folder>/<subset>/<split>.{jsonl,json,parquet}`.
`source` is None or "hf://<repo id>" for the hub, else such a folder. Rows are validated as for
TOFU (one-line DataError naming file and row).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

from jaxunlearn.data.errors import DataError
from jaxunlearn.data.files import HUB_PREFIX, Rows, find_split_file, hub_rows, is_hub, read_records, validate

MUSE_HUB = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}

_TEXT = {"text": "str"}
_QA = {"question": "str", "answer": "str"}
MUSE_SCHEMAS: dict[str, dict[str, dict[str, str]]] = {
    "raw": {s: _TEXT for s in ("forget", "retain1", "retain2", "holdout")},
    "verbmem": {"forget": {"prompt": "str", "gt": "str"}},
    "knowmem": {s: _QA for s in ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl")},
    "privleak": {s: _TEXT for s in ("forget", "retain", "holdout")},
}


@dataclass
class MuseBenchmark:
    """One MUSE corpus. Raw texts are plain strings; verbmem and knowmem rows are dicts."""

    name: str
    forget: list[str]
    retain: list[str]
    retain_eval: list[str]
    holdout: list[str]
    verbmem_forget: list[dict]
    knowmem_forget: list[dict]
    knowmem_retain: list[dict]
    knowmem_forget_icl: list[dict]
    knowmem_retain_icl: list[dict]
    privleak: dict[str, list[str]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Row count of every split (PrivLeak texts as privleak_NAME)."""
        out = {k: len(v) for k, v in vars(self).items() if isinstance(v, list)}
        out.update({f"privleak_{k}": len(v) for k, v in self.privleak.items()})
        return out


def _hub_repo(corpus: str, source: str | None) -> str:
    if source is not None:
        return source[len(HUB_PREFIX):]
    if corpus not in MUSE_HUB:
        raise DataError(f"unknown MUSE corpus {corpus!r}; expected one of {', '.join(MUSE_HUB)}")
    return MUSE_HUB[corpus]


def _raw_rows(corpus: str, subset: str, split: str, source: str | pathlib.Path | None) -> Rows:
    if is_hub(source):
        import datasets

        repo = _hub_repo(corpus, source)
        return hub_rows(f"hub {repo}[{subset}/{split}]", lambda: datasets.load_dataset(repo, subset, split=split))
    return read_records(find_split_file(pathlib.Path(source) / subset, split))


def load_muse(corpus: str, subset: str, split: str, source: str | pathlib.Path | None = None) -> list[dict]:
    """Validated rows of one MUSE subset/split ("news" or "books"; see module docstring)."""
    if subset not in MUSE_SCHEMAS or split not in MUSE_SCHEMAS[subset]:
        known = ", ".join(f"{s}/{p}" for s in MUSE_SCHEMAS for p in MUSE_SCHEMAS[s])
        raise DataError(f"unknown MUSE split {subset}/{split}; expected one of {known}")
    return validate(_raw_rows(corpus, subset, split, source), MUSE_SCHEMAS[subset][split], f"{subset}/{split}")


def _texts(corpus: str, subset: str, split: str, source) -> list[str]:
    return [r["text"] for r in load_muse(corpus, subset, split, source)]


def muse_benchmark(corpus: str = "news", source: str | pathlib.Path | None = None,
                   privleak: bool = True) -> MuseBenchmark:
    """All MUSE splits of one corpus ("news" or "books")."""
    if corpus not in MUSE_HUB:
        raise DataError(f"unknown MUSE corpus {corpus!r}; expected one of {', '.join(MUSE_HUB)}")
    return MuseBenchmark(
        name=f"muse-{corpus}",
        forget=_texts(corpus, "raw", "forget", source),
        retain=_texts(corpus, "raw", "retain1", source),
        retain_eval=_texts(corpus, "raw", "retain2", source),
        holdout=_texts(corpus, "raw", "holdout", source),
        verbmem_forget=load_muse(corpus, "verbmem", "forget", source),
        knowmem_forget=load_muse(corpus, "knowmem", "forget_qa", source),
        knowmem_retain=load_muse(corpus, "knowmem", "retain_qa", source),
        knowmem_forget_icl=load_muse(corpus, "knowmem", "forget_qa_icl", source),
        knowmem_retain_icl=load_muse(corpus, "knowmem", "retain_qa_icl", source),
        privleak={s: _texts(corpus, "privleak", s, source) for s in ("forget", "retain", "holdout")} if privleak else {},
    )


def knowmem_prompt(icl: list[dict], question: str) -> str:
    """Few-shot KnowMem prompt exactly as MUSE's metrics/knowmem.py (and open-unlearning's Llama-2 base
    template) builds it: "Question: {q}\\nAnswer: {a}\\n\\n" per example, then
    "Question: {question}\\nAnswer: " ending in a space (MUSE's models were trained on raw text,
    not on our QA format, so MUSE's prompt is the right one here)."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    return f"{shots}Question: {question}\nAnswer: "
