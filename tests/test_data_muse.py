"""MUSE loading from small fixture folders in the hub's layout, and through the hub code path."""

import json

import pytest

from jaxunlearn.data import DataError, knowmem_prompt, load_muse, muse_benchmark
from jaxunlearn.data.muse import MUSE_SCHEMAS
from jaxunlearn.data.prompts import encode_texts
from jaxunlearn.ops import IGNORE


def _rows(subset, split):
    fields = MUSE_SCHEMAS[subset][split]
    return [{k: f"{subset} {split} {k} {i} " + "word " * i for k in fields} for i in range(3)]


@pytest.fixture(scope="module")
def muse_dir(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("muse")
    for n, (subset, splits) in enumerate(MUSE_SCHEMAS.items()):
        (root / subset).mkdir()
        for split in splits:
            rows = _rows(subset, split)
            if n % 3 == 0:
                (root / subset / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
            elif n % 3 == 1:
                (root / subset / f"{split}.json").write_text(json.dumps(rows), encoding="utf-8")
            else:
                pq.write_table(pa.Table.from_pylist(rows), root / subset / f"{split}.parquet")
    return root


def test_muse_benchmark_from_folder(muse_dir):
    bench = muse_benchmark("books", muse_dir)
    assert bench.name == "muse-books"
    assert bench.forget == [r["text"] for r in _rows("raw", "forget")]
    assert bench.retain == [r["text"] for r in _rows("raw", "retain1")]
    assert bench.retain_eval == [r["text"] for r in _rows("raw", "retain2")]
    assert bench.holdout == [r["text"] for r in _rows("raw", "holdout")]
    assert bench.verbmem_forget == _rows("verbmem", "forget")
    assert bench.knowmem_forget == _rows("knowmem", "forget_qa")
    assert bench.knowmem_retain_icl == _rows("knowmem", "retain_qa_icl")
    assert bench.privleak["holdout"] == [r["text"] for r in _rows("privleak", "holdout")]


def test_muse_missing_split_and_bad_row(muse_dir, tmp_path):
    with pytest.raises(DataError, match=r"/raw: data folder does not exist$"):
        muse_benchmark("news", tmp_path)
    (tmp_path / "knowmem").mkdir()
    with pytest.raises(FileNotFoundError, match=r"/knowmem: no file for split 'forget_qa' \(looked for forget_qa.jsonl"):
        load_muse("news", "knowmem", "forget_qa", tmp_path)
    (tmp_path / "verbmem").mkdir()
    (tmp_path / "verbmem" / "forget.jsonl").write_text('{"prompt": "a", "gt": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"forget.jsonl line 2: missing field 'gt'$"):
        load_muse("news", "verbmem", "forget", tmp_path)
    with pytest.raises(DataError, match="unknown MUSE corpus"):
        muse_benchmark("poems", muse_dir)


def test_muse_hub_path(monkeypatch):
    import datasets

    calls = []

    def fake_load(repo, subset, split=None, **kwargs):
        calls.append((repo, subset, split))
        return datasets.Dataset.from_list(_rows(subset, split))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_muse("news", "knowmem", "retain_qa") == _rows("knowmem", "retain_qa")
    assert calls == [("muse-bench/MUSE-News", "knowmem", "retain_qa")]


def test_knowmem_prompt_and_text_chunks(tmp_path):
    from jaxunlearn.data import synthetic_tokenizer

    icl = [{"question": "Q1?", "answer": "A1."}, {"question": "Q2?", "answer": "A2."}]
    # MUSE metrics/knowmem.py: the prompt ends "Answer: " with a space
    assert knowmem_prompt(icl, "Q3?") == "Question: Q1?\nAnswer: A1.\n\nQuestion: Q2?\nAnswer: A2.\n\nQuestion: Q3?\nAnswer: "
    tok = synthetic_tokenizer(0, cache=tmp_path)
    text = " ".join(["The silver river runs north."] * 12)
    chunks = encode_texts(tok, [text, "Short."], max_len=16)
    body = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_long = -(-len(body) // 15)
    assert len(chunks) == n_long + 1
    assert [t for c in chunks[:n_long] for t in c["input_ids"][1:]] == body
    for c in chunks:
        assert c["input_ids"][0] == tok.bos_token_id and len(c["input_ids"]) <= 16
        assert c["labels"] == [IGNORE] + c["input_ids"][1:]


def test_text_prefix_as_open_unlearning_mia(tmp_path):
    # open-unlearning CompletionDataset (MUSE_MIA, max_length 2048): tokenizer(text) with BOS, first
    # max_length text ids, no EOS, index 0 unlabelled
    from jaxunlearn.data import synthetic_tokenizer
    from jaxunlearn.data.prompts import encode_text_prefix

    tok = synthetic_tokenizer(0, cache=tmp_path)
    text = " ".join(["The silver river runs north."] * 12)
    body = tok(text, add_special_tokens=False)["input_ids"]
    ex = encode_text_prefix(tok, text, max_tokens=20)
    assert ex["input_ids"] == [tok.bos_token_id] + body[:20]
    assert ex["labels"] == [IGNORE] + body[:20]
    short = encode_text_prefix(tok, "Short.", max_tokens=20)
    assert tok.eos_token_id not in short["input_ids"] and len(short["input_ids"]) < 20
