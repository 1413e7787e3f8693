"""TOFU loading from the real plain-file copy, in every accepted file format, and through the hub code path."""

import json

import pytest

from jaxunlearn.data import DataError, load_tofu, tofu_benchmark
from jaxunlearn.data.tofu import TOFU_SPLITS

SIZES = {"full": 4000, "forget01": 40, "forget05": 200, "forget10": 400,
         "retain99": 3960, "retain95": 3800, "retain90": 3600}


@pytest.fixture(scope="module")
def splits(tofu_dir):
    return {name: load_tofu(name, tofu_dir) for name in TOFU_SPLITS}


def _qa(rows):
    return [(r["question"], r["answer"]) for r in rows]


def test_split_sizes(splits):
    assert {k: len(splits[k]) for k in SIZES} == SIZES
    for p, n in (("01", 40), ("05", 200), ("10", 400)):
        assert len(splits[f"forget{p}_perturbed"]) == n and len(splits[f"holdout{p}"]) == n
    assert len(splits["retain_perturbed"]) == 400
    assert len(splits["real_authors_perturbed"]) == 100 and len(splits["world_facts_perturbed"]) == 117


def test_slices_of_full(splits):
    full = _qa(splits["full"])
    assert _qa(splits["forget10"]) == full[-400:]
    for forget, retain in (("forget01", "retain99"), ("forget05", "retain95"), ("forget10", "retain90")):
        n = len(splits[forget])
        assert _qa(splits[forget]) == full[-n:] and _qa(splits[retain]) == full[:-n]
        assert _qa(splits[f"{forget}_perturbed"]) == _qa(splits[forget])
    assert _qa(splits["retain_perturbed"]) == full[:400]


def test_perturbed_answers(splits):
    for name in ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed"):
        for row in splits[name]:
            assert len(row["perturbed_answer"]) == 5
            assert isinstance(row["paraphrased_answer"], str) and row["paraphrased_answer"]
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        assert all(len(r["perturbed_answer"]) == 3 for r in splits[name])


def test_benchmark_assembly(tofu_dir, splits):
    bench = tofu_benchmark("forget05", tofu_dir)
    assert bench.name == "tofu-forget05"
    assert bench.forget == splits["forget05"] and bench.retain == splits["retain95"]
    assert bench.holdout == splits["holdout05"] and bench.forget_perturbed == splits["forget05_perturbed"]
    assert bench.extra_evals["world_facts"] == splits["world_facts_perturbed"]
    assert bench.full == splits["full"]
    assert len(bench.idk) == 100 and "I don't have that information." in bench.idk
    with pytest.raises(DataError, match="forget07"):
        tofu_benchmark("forget07", tofu_dir)


def test_json_and_parquet_folders_give_same_rows(splits, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = splits["forget01_perturbed"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "forget01_perturbed.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "b").mkdir()
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    (tmp_path / "b" / "forget01_perturbed.json").write_text(json.dumps(columns), encoding="utf-8")
    (tmp_path / "c").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c" / "forget01_perturbed.parquet")
    (tmp_path / "d").mkdir()  # datasets.to_json(lines=False) style: JSON arrays, one per line
    (tmp_path / "d" / "forget01_perturbed.jsonl").write_text(
        json.dumps(rows[:25]) + "\n" + json.dumps(rows[25:]) + "\n", encoding="utf-8")
    for sub in "abcd":
        assert load_tofu("forget01_perturbed", tmp_path / sub) == rows, sub


def test_hub_path_shares_validation(monkeypatch, splits):
    import datasets

    calls = []

    def fake_load(repo, name, *args, **kwargs):
        calls.append((repo, name))
        rows = [dict(r) for r in splits["forget01"]]
        if name == "forget01" and repo == "me/broken":
            del rows[6]["answer"]
        return {"train": datasets.Dataset.from_list(rows)}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_tofu("forget01") == splits["forget01"]
    assert calls == [("locuslab/TOFU", "forget01")]
    with pytest.raises(DataError, match=r"^hub me/broken\[forget01\] row 7: missing field 'answer'$"):
        load_tofu("forget01", "hf://me/broken")
