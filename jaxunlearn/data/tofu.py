"""TOFU (Maini et al., 2024): every split, from the hub id locuslab/TOFU or a local folder.

`source`:
  None or "hf://<repo id>"  the hub, through `datasets.load_dataset(repo, split)["train"]`
                            (default repo locuslab/TOFU; needs network or a warm datasets cache)
  a folder path             files named `<split>.jsonl`, `<split>.json` or `<split>.parquet`
Both paths run the same per-split field validation (`TOFU_SCHEMAS`) and raise DataError /
DataFileNotFoundError with one line naming the file (or hub split) and row.

A local folder may also hold `idontknow.jsonl` (plain text, one refusal per line, as in the TOFU
repository); `tofu_benchmark` uses it as the target-answer pool, else DEFAULT_IDK.
"""

from __future__ import annotations

import pathlib

from jaxunlearn.data.benchmark import DEFAULT_IDK, UnlearnBenchmark
from jaxunlearn.data.errors import DataError, DataFileNotFoundError
from jaxunlearn.data.files import (HUB_PREFIX, Rows, find_split_file, hub_rows, is_hub, read_records, read_text_lines,
                                   validate)

HUB_ID = "locuslab/TOFU"

_QA = {"question": "str", "answer": "str"}
_PERTURBED = {**_QA, "paraphrased_answer": "str", "perturbed_answer": "str_list"}
_EXTRA_PERTURBED = {**_QA, "perturbed_answer": "str_list"}
_OPTIONS = {"question": "str", "option1": "str", "option2": "str", "option3": "str", "option4": "str", "answer": "str"}

TOFU_SCHEMAS: dict[str, dict[str, str]] = {
    "full": _QA,
    **{f"forget{p}": _QA for p in ("01", "05", "10")},
    **{f"retain{p}": _QA for p in ("90", "95", "99")},
    **{f"holdout{p}": _QA for p in ("01", "05", "10")},
    **{f"forget{p}_perturbed": _PERTURBED for p in ("01", "05", "10")},
    "retain_perturbed": _PERTURBED,
    "real_authors": _OPTIONS,
    "world_facts": _OPTIONS,
    "real_authors_perturbed": _EXTRA_PERTURBED,
    "world_facts_perturbed": _EXTRA_PERTURBED,
}
TOFU_SPLITS = tuple(TOFU_SCHEMAS)
FORGET_SPLITS = ("forget01", "forget05", "forget10")


def _raw_rows(split: str, source: str | pathlib.Path | None) -> Rows:
    if is_hub(source):
        import datasets

        repo = HUB_ID if source is None else source[len(HUB_PREFIX):]
        return hub_rows(f"hub {repo}[{split}]", lambda: datasets.load_dataset(repo, split)["train"])
    return read_records(find_split_file(pathlib.Path(source), split))


def load_tofu(split: str, source: str | pathlib.Path | None = None) -> list[dict]:
    """Validated rows of one TOFU split (see module docstring for `source`)."""
    if split not in TOFU_SCHEMAS:
        raise DataError(f"unknown TOFU split {split!r}; expected one of {', '.join(TOFU_SPLITS)}")
    return validate(_raw_rows(split, source), TOFU_SCHEMAS[split], split)


def _idk_pool(source: str | pathlib.Path | None) -> list[str]:
    if is_hub(source):
        return list(DEFAULT_IDK)
    try:
        return read_text_lines(pathlib.Path(source) / "idontknow.jsonl")
    except DataFileNotFoundError:
        return list(DEFAULT_IDK)


def tofu_benchmark(forget_split: str = "forget10", source: str | pathlib.Path | None = None) -> UnlearnBenchmark:
    """TOFU for one forget split: forgetXX / retain(100-XX) / holdoutXX and their evaluation splits.

    extra_evals holds real_authors_perturbed and world_facts_perturbed as "real_authors" and "world_facts".
    """
    if forget_split not in FORGET_SPLITS:
        raise DataError(f"unknown TOFU forget split {forget_split!r}; expected one of {', '.join(FORGET_SPLITS)}")
    pct = forget_split[len("forget"):]
    return UnlearnBenchmark(
        name=f"tofu-{forget_split}",
        forget=load_tofu(forget_split, source),
        retain=load_tofu(f"retain{100 - int(pct)}", source),
        holdout=load_tofu(f"holdout{pct}", source),
        forget_perturbed=load_tofu(f"{forget_split}_perturbed", source),
        retain_perturbed=load_tofu("retain_perturbed", source),
        extra_evals={name: load_tofu(f"{name}_perturbed", source) for name in ("real_authors", "world_facts")},
        full=load_tofu("full", source),
        idk=_idk_pool(source),
    )
