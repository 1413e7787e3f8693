"""Synthetic benchmark, tokenizer, prompt formats, label masks, bucketing and the paired iterator."""

import numpy as np
import pytest

from jaxunlearn.data import (
    CHAT,
    LLAMA2_CHAT,
    DataError,
    PairedIterator,
    collate,
    collate_prompts,
    encode_prompt,
    encode_qa,
    encode_rows,
    host_slice,
    prompt_format_for,
    prompt_text,
    synthetic_benchmark,
    synthetic_tokenizer,
    target_rows,
    to_global,
)
from jaxunlearn.ops import IGNORE

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def bench():
    return synthetic_benchmark(seed=0)


@pytest.fixture(scope="module")
def tok(bench, tmp_path_factory):
    return synthetic_tokenizer(bench, cache=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def chat_tok(bench, tmp_path_factory):
    t = synthetic_tokenizer(bench, cache=tmp_path_factory.mktemp("tok_chat"))
    t.chat_template = CHAT_TEMPLATE
    return t


# ----------------------------------------------------------------------------- synthetic benchmark

def test_synthetic_is_deterministic_and_seeded(bench):
    again = synthetic_benchmark(seed=0)
    assert again == bench
    other = synthetic_benchmark(seed=1)
    assert other.forget != bench.forget


def test_synthetic_splits_mirror_tofu(bench):
    n_forget_rows = 4 * 8
    assert len(bench.forget) == n_forget_rows
    assert bench.forget == bench.full[-n_forget_rows:]
    assert bench.retain == bench.full[:-n_forget_rows]
    assert [{"question": r["question"], "answer": r["answer"]} for r in bench.forget_perturbed] == bench.forget
    full_pairs = {(r["question"], r["answer"]) for r in bench.full}
    assert not full_pairs & {(r["question"], r["answer"]) for r in bench.holdout}
    assert len(bench.holdout) == n_forget_rows
    for r in bench.forget_perturbed + bench.retain_perturbed:
        assert len(r["perturbed_answer"]) == 5
        assert r["paraphrased_answer"] not in r["perturbed_answer"]
        assert len(set(r["perturbed_answer"])) == 5
    for name in ("real_authors", "world_facts"):
        rows = bench.extra_evals[name]
        assert rows and all(r["answer"] not in r["perturbed_answer"] for r in rows)
        assert {(r["question"], r["answer"]) for r in rows} <= full_pairs


def test_synthetic_sizes_configurable():
    b = synthetic_benchmark(seed=3, n_entities=10, n_forget=2, n_holdout=3, facts_per_entity=4,
                            n_perturbed=3, general_knowledge=False)
    assert (len(b.full), len(b.forget), len(b.holdout)) == (40, 8, 12)
    assert all(len(r["perturbed_answer"]) == 3 for r in b.forget_perturbed)
    with pytest.raises(DataError, match="n_forget"):
        synthetic_benchmark(n_entities=4, n_forget=4)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_cached_deterministic_and_roundtrips(bench, tok, tmp_path):
    fresh = synthetic_tokenizer(bench, cache=tmp_path)  # trained again in an empty cache
    files = list(tmp_path.glob("bpe-*.json"))
    assert len(files) == 1
    assert fresh.get_vocab() == tok.get_vocab()
    assert synthetic_tokenizer(bench, cache=tmp_path).get_vocab() == tok.get_vocab()  # from cache
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text = bench.forget[0]["answer"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    assert len(tok(text, add_special_tokens=False)["input_ids"]) < len(text) / 2  # merges were learned


# ----------------------------------------------------------------------------- prompt formats and labels

def _check_labels(tokenizer, fmt, question, answer):
    enc = encode_qa(tokenizer, fmt, question, answer, max_len=256)
    ids, labels = np.array(enc["input_ids"]), np.array(enc["labels"])
    scored = labels != IGNORE
    start = int(np.argmax(scored))
    prompt_ids = encode_prompt(tokenizer, fmt, question)
    # The unscored part is exactly the prompt, the scored part is a suffix: answer tokens then EOS.
    assert start == len(prompt_ids) and list(ids[:start]) == prompt_ids
    assert scored[start:].all() and not scored[:start].any()
    assert (labels[scored] == ids[scored]).all()
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[start:-1]) == fmt.answer_template.format(a=answer)
    return ids, start


@pytest.mark.parametrize("family", ["qa", "llama2-chat"])
def test_label_mask_is_answer_plus_eos(tok, bench, family):
    fmt = prompt_format_for(tok, family)
    row = bench.forget[3]
    ids, start = _check_labels(tok, fmt, row["question"], row["answer"])
    assert ids[0] == tok.bos_token_id
    expected = {"qa": f"Question: {row['question']}\nAnswer:", "llama2-chat": f"[INST] {row['question']} [/INST]"}
    assert tok.decode(ids[1:start]) == expected[family]


def test_label_mask_chat_template(chat_tok, bench):
    fmt = prompt_format_for(chat_tok)
    assert fmt == CHAT
    row = bench.forget[5]
    ids, start = _check_labels(chat_tok, fmt, row["question"], row["answer"])
    want = f"<s>system: You are a helpful assistant.\n<s>user: {row['question']}\n<s>assistant:"
    assert chat_tok.decode(ids[:start]) == want == prompt_text(chat_tok, fmt, row["question"])


def test_prompt_family_guess_and_errors(tok):
    assert prompt_format_for(tok).name == "qa"
    assert prompt_format_for(tok, "llama2-chat") == LLAMA2_CHAT
    assert prompt_format_for(tok, LLAMA2_CHAT) is LLAMA2_CHAT
    with pytest.raises(DataError, match="chat template"):
        prompt_format_for(tok, "chat")
    with pytest.raises(DataError, match="unknown prompt family"):
        prompt_format_for(tok, "gpt9")


def test_truncation_counted_in_one_warning(tok, bench):
    fmt = prompt_format_for(tok)
    rows = bench.forget[:6]
    with pytest.warns(UserWarning, match=r"6 of 6 samples .* max_len=8") as record:
        out = encode_rows(tok, fmt, rows, max_len=8)
    assert len(record) == 1
    assert all(len(e["input_ids"]) == len(e["labels"]) == 8 for e in out)
    assert out[0] == encode_qa(tok, fmt, rows[0]["question"], rows[0]["answer"], 8)


# ----------------------------------------------------------------------------- batching

def test_collate_buckets_and_padding(tok, bench):
    fmt = prompt_format_for(tok)
    ex = encode_rows(tok, fmt, bench.forget[:4], max_len=64)
    batch = collate(ex, tok.pad_token_id, buckets=(16, 64, 128))
    longest = max(len(e["input_ids"]) for e in ex)
    assert longest > 16 and batch["input_ids"].shape == (4, 64)
    assert all(v.dtype == np.int32 for v in batch.values())
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        assert list(batch["input_ids"][i, :n]) == e["input_ids"] and (batch["input_ids"][i, n:] == 0).all()
        assert batch["attention_mask"][i].sum() == n and batch["attention_mask"][i, :n].all()
        assert (batch["labels"][i, n:] == IGNORE).all()
    with pytest.raises(DataError, match="largest bucket"):
        collate(ex, 0, buckets=(16,))


def test_collate_prompts_left_pads(tok, bench):
    fmt = prompt_format_for(tok)
    prompts = [encode_prompt(tok, fmt, r["question"]) for r in bench.forget[:3]]
    out = collate_prompts(prompts, tok.pad_token_id, buckets=(8, 32))
    assert out["input_ids"].shape == (3, 32)
    for i, p in enumerate(prompts):
        assert list(out["input_ids"][i, 32 - len(p):]) == p
        assert out["attention_mask"][i].sum() == len(p) and out["attention_mask"][i, -1] == 1


def _fake(n, tag):
    return [{"input_ids": [tag, i + 10] + [5] * (i % 3), "labels": [IGNORE, i + 10] + [5] * (i % 3)} for i in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for field in a[k]:
            np.testing.assert_array_equal(a[k][field], b[k][field])


def test_iterator_deterministic_and_restartable():
    forget, retain = _fake(10, 1), _fake(23, 2)
    it = PairedIterator(forget, retain, batch_size=4, seed=7, buckets=(8,), pad_id=0)
    assert it.steps_per_epoch == 3
    first = list(it.iterate(0, 9))
    again = list(PairedIterator(forget, retain, batch_size=4, seed=7, buckets=(8,), pad_id=0).iterate(0, 9))
    for a, b in zip(first, again):
        _same(a, b)
    for k in (0, 4, 8):
        _same(it.batch_at(k), first[k])
        for a, b in zip(it.iterate(k, 9 - k), first[k:]):
            _same(a, b)
    other = PairedIterator(forget, retain, batch_size=4, seed=8, buckets=(8,), pad_id=0).batch_at(0)
    assert not np.array_equal(other["forget"]["input_ids"], first[0]["forget"]["input_ids"])


def test_iterator_epochs_cover_sets():
    forget, retain = _fake(10, 1), _fake(23, 2)
    it = PairedIterator(forget, retain, batch_size=4, seed=0, buckets=(8,), pad_id=0)
    for epoch in range(2):
        idx = np.concatenate([it.forget_indices(epoch * 3 + k) for k in range(3)])
        assert sorted(set(idx.tolist())) == list(range(10)) and len(idx) == 12
    orders = [tuple(np.concatenate([it.forget_indices(e * 3 + k) for k in range(3)])[:10]) for e in range(3)]
    assert len(set(orders)) > 1  # reshuffled each epoch
    stream = np.concatenate([it.retain_indices(s) for s in range(23)])  # 92 = 4 passes of 23
    for p in range(4):
        assert sorted(stream[p * 23:(p + 1) * 23].tolist()) == list(range(23))


def test_iterator_target_follows_forget(tok, bench):
    fmt = prompt_format_for(tok)
    forget = encode_rows(tok, fmt, bench.forget, 64)
    targets = target_rows(bench.forget, bench.idk, seed=0)
    assert [t["question"] for t in targets] == [r["question"] for r in bench.forget]
    assert {t["answer"] for t in targets} <= set(bench.idk)
    target = encode_rows(tok, fmt, targets, 64)
    retain = encode_rows(tok, fmt, bench.retain[:40], 64)
    it = PairedIterator(forget, retain, 8, seed=1, buckets=(64,), pad_id=tok.pad_token_id, target=target)
    b = it.batch_at(5)
    assert set(b) == {"forget", "retain", "target"} and b["target"]["input_ids"].shape == (8, 64)
    for i, j in enumerate(it.forget_indices(5)):
        n = len(encode_prompt(tok, fmt, bench.forget[j]["question"]))
        np.testing.assert_array_equal(b["target"]["input_ids"][i, :n], b["forget"]["input_ids"][i, :n])
    with pytest.raises(DataError, match="target set"):
        PairedIterator(forget, retain, 8, target=target[:-1])


def test_to_global_and_host_slice():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    batch = PairedIterator(_fake(16, 1), _fake(16, 2), 8, buckets=(8,)).batch_at(0)
    assert host_slice(batch["forget"], 0, 1)["input_ids"].shape == (8, 8)
    assert (host_slice(batch["forget"], 1, 2)["labels"] == batch["forget"]["labels"][4:]).all()
    glob = to_global(batch, NamedSharding(mesh, P("data")))
    assert glob["retain"]["input_ids"].sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(glob["forget"]["labels"]), batch["forget"]["labels"])


def test_boundary_merge_falls_back_to_separate_answer_ids():
    """A tokenizer that merges the prompt's last character with the answer's first one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<pad>", "<s>", "</s>", "<unk>", "Q", ":", "x", "y", "Qx"]
    vocab = {c: i for i, c in enumerate(chars)} | {":x": len(chars)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[(":", "x")], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    fmt = prompt_format_for(tok, "qa").__class__("edge", prompt_template="Q{q}:", answer_template="{a}", add_bos=False)
    assert tok("Qy:xy", add_special_tokens=False)["input_ids"][2] == vocab[":x"]  # the merge happens
    enc = encode_qa(tok, fmt, "y", "xy", 16)
    assert enc["input_ids"] == [vocab["Q"], vocab["y"], vocab[":"], vocab["x"], vocab["y"], tok.eos_token_id]
    assert enc["labels"] == [IGNORE] * 3 + enc["input_ids"][3:]


def test_synthetic_retain_perturbed_stays_in_retain():
    # more authors to forget than to keep: the retain evaluation split must not contain forget rows
    b = synthetic_benchmark(seed=0, n_entities=5, n_forget=3, facts_per_entity=2)
    retain_pairs = {(r["question"], r["answer"]) for r in b.retain}
    forget_pairs = {(r["question"], r["answer"]) for r in b.forget}
    pert_pairs = {(r["question"], r["answer"]) for r in b.retain_perturbed}
    assert pert_pairs and pert_pairs <= retain_pairs and not pert_pairs & forget_pairs


def test_synthetic_too_many_perturbed_answers_is_an_error():
    # only 11 wrong genres exist: asking for more must fail fast, not loop forever
    with pytest.raises(DataError, match="n_perturbed"):
        synthetic_benchmark(n_entities=4, n_forget=1, facts_per_entity=3, n_perturbed=12)
