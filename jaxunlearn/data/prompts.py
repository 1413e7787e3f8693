"""Prompt formats per model family and QA tokenisation with answer-only labels.

Exact texts ("|" marks where the prompt ends and the scored answer begins; [BOS] where the
tokenizer adds one by default, i.e. Llama yes, Phi no; [EOS] always):
  "qa"          base models (Phi-1.5, Llama-2 base):   [BOS]Question: {q}\nAnswer:| {a}[EOS]
  "llama2-chat" Llama-2 chat:                         [BOS][INST] {q} [/INST]|{a}[EOS]
  "chat"        other instruct models: the tokenizer's chat template with the system prompt
                "You are a helpful assistant." and the generation prompt|{a}[EOS]
No system prompt in "llama2-chat" (as TOFU and open-unlearning). The generation prompt is the
text before "|": "Question: {q}\nAnswer:" with NO trailing space, "[INST] {q} [/INST]".

Why the space belongs to the answer: byte-level BPE (Phi, GPT-2) and SentencePiece (Llama) attach
a space to the word after it ("ĠParis", "▁Paris"), so in "Answer: Paris" the token after ":" is the
answer's first token, space included. A prompt ending "Answer: " instead ends in a lone-space token
("Ġ" / "▁") that never follows "Answer:" in a training sequence encoded this way, so a model
fine-tuned in the "qa" format is asked to continue from an input it never saw: the demo's reference
model scores ROUGE-L recall 0.997 on its training questions from "Answer:" and 0.062 from "Answer: "
(experiments/bench/prompt_trailing_space.py). MUSE's KnowMem prompt does end "Answer: " (MUSE's
models are trained on raw text; `jaxunlearn.data.knowmem_prompt`).

Token for token against the references (tests/test_evals_prompt_formats.py, HF tokenizers):
- input ids of prompt + answer + EOS are identical to TOFU's (data_module.py
  convert_raw_data_to_model_format) and open-unlearning's (src/data/utils.py
  preprocess_chat_instance with configs/model/phi-1_5.yaml, Llama-2-7b-hf.yaml, Llama-2-7b-chat-hf.yaml)
  in both formats; in "llama2-chat" the labels are identical too (answer tokens and EOS).
- labels in "qa" differ between the references, and ours sit between them: TOFU also scores the
  "Answer:" tokens; open-unlearning's prompt "Question: {q}\nAnswer: " is one token longer than
  what precedes the answer in the joint encoding (its lone space), so it leaves the answer's first
  token unscored; we score exactly " {a}" and EOS.
- generation prompts: "llama2-chat" as both; "qa" ends at "Answer:" where open-unlearning's ends
  "Answer: " and TOFU's generation prompt is "Question: {q}\n" (its split on "Answer: ").

Tokenisation (as in the TOFU reference code): the prompt and prompt+answer are tokenised as
text and the answer's ids are what follows the prompt's ids; where the tokenizer merges across
the boundary the answer is tokenised on its own instead (TOFU and open-unlearning keep the joint
ids and count the prompt's tokens). Labels equal the input ids on answer tokens and EOS, IGNORE
elsewhere (aligned with input_ids; see ops.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from jaxunlearn.data.errors import DataError
from jaxunlearn.ops import IGNORE

SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class PromptFormat:
    """How a question and an answer become text. Templates use {q} and {a}."""

    name: str
    prompt_template: str = "Question: {q}\nAnswer:"
    answer_template: str = " {a}"
    system_prompt: str | None = None
    add_bos: bool = True
    use_chat_template: bool = False


QA = PromptFormat("qa")
LLAMA2_CHAT = PromptFormat("llama2-chat", prompt_template="[INST] {q} [/INST]", answer_template="{a}")
CHAT = PromptFormat("chat", prompt_template="{q}", answer_template="{a}", system_prompt=SYSTEM_PROMPT,
                    add_bos=False, use_chat_template=True)

_FAMILIES = {
    "qa": QA, "base": QA, "phi": QA, "llama2": QA, "llama": QA,
    "llama2-chat": LLAMA2_CHAT,
    "chat": CHAT, "instruct": CHAT,
}


def _ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token first when asked for special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and int(ids[0]) == int(bos)


def prompt_format_for(tokenizer: Any, family: str | PromptFormat | None = None) -> PromptFormat:
    """The prompt format for a tokenizer: by family name, or guessed from the tokenizer.

    Families: qa/base/phi/llama2/llama, llama2-chat, chat/instruct. Guess (family=None):
    a Llama-2 chat tokenizer -> llama2-chat; one with a chat template -> chat; else qa.
    A PromptFormat is returned as it is.
    """
    if isinstance(family, PromptFormat):
        return family
    if family is None:
        name = str(getattr(tokenizer, "name_or_path", "")).lower()
        if "llama-2" in name and "chat" in name:
            family = "llama2-chat"
        elif getattr(tokenizer, "chat_template", None):
            family = "chat"
        else:
            family = "qa"
    if family not in _FAMILIES:
        raise DataError(f"unknown prompt family {family!r}; expected one of {sorted(_FAMILIES)}")
    fmt = _FAMILIES[family]
    if fmt.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"prompt family {family!r} needs a tokenizer with a chat template")
        return fmt
    return replace(fmt, add_bos=tokenizer_adds_bos(tokenizer))


def prompt_text(tokenizer: Any, fmt: PromptFormat, question: str) -> str:
    """The prompt string for a question (for chat formats, the rendered chat template)."""
    if not fmt.use_chat_template:
        return fmt.prompt_template.format(q=question)
    user = fmt.prompt_template.format(q=question)
    messages = [{"role": "user", "content": user}]
    if fmt.system_prompt:
        messages.insert(0, {"role": "system", "content": fmt.system_prompt})
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # templates that reject a system turn: fold it into the user turn
        if not fmt.system_prompt:
            raise
        merged = [{"role": "user", "content": f"{fmt.system_prompt}\n\n{user}"}]
        return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)


def _bos(tokenizer: Any, fmt: PromptFormat) -> list[int]:
    return [int(tokenizer.bos_token_id)] if fmt.add_bos and tokenizer.bos_token_id is not None else []


def encode_prompt(tokenizer: Any, fmt: PromptFormat, question: str) -> list[int]:
    """Token ids of the generation prompt for a question (BOS included where the format adds it)."""
    return _bos(tokenizer, fmt) + _ids(tokenizer, prompt_text(tokenizer, fmt, question))


def _encode_many(tokenizer: Any, fmt: PromptFormat, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """For each (question, answer): (ids of BOS+prompt+answer+EOS, number of leading unscored ids)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
    prompts = [prompt_text(tokenizer, fmt, q) for q, _ in pairs]
    answers = [fmt.answer_template.format(a=a) for _, a in pairs]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    joint_ids = tokenizer([p + a for p, a in zip(prompts, answers)], add_special_tokens=False)["input_ids"]
    bos = _bos(tokenizer, fmt)
    out = []
    for answer, p_ids, j_ids in zip(answers, prompt_ids, joint_ids):
        p_ids, j_ids = [int(i) for i in p_ids], [int(i) for i in j_ids]
        if j_ids[: len(p_ids)] == p_ids and len(j_ids) > len(p_ids):
            a_ids = j_ids[len(p_ids):]
        else:  # the tokenizer merged across the prompt/answer boundary
            a_ids = _ids(tokenizer, answer)
        out.append((bos + p_ids + a_ids + [int(eos)], len(bos) + len(p_ids)))
    return out


def _cut(ids: list[int], n_prompt: int, max_len: int) -> dict[str, list[int]]:
    labels = [IGNORE] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def encode_qa(tokenizer: Any, fmt: PromptFormat, question: str, answer: str, max_len: int) -> dict[str, list[int]]:
    """Encode one QA pair: dict(input_ids, labels), at most max_len tokens (cut at the end).

    Labels are IGNORE on BOS and prompt tokens and equal input_ids on answer tokens and EOS.
    """
    return encode_pairs(tokenizer, fmt, [(question, answer)], max_len)[0]


def encode_pairs(tokenizer: Any, fmt: PromptFormat, pairs: Sequence[tuple[str, str]],
                 max_len: int) -> list[dict[str, list[int]]]:
    """encode_qa of many (question, answer) pairs, tokenized as two batches (prompts, prompts + answers)."""
    return [_cut(ids, n_prompt, max_len) for ids, n_prompt in _encode_many(tokenizer, fmt, pairs)] if pairs else []


def encode_rows(
    tokenizer: Any,
    fmt: PromptFormat,
    rows: Sequence[Mapping],
    max_len: int,
    question_key: str = "question",
    answer_key: str = "answer",
) -> list[dict[str, list[int]]]:
    """encode_qa over rows; samples longer than max_len are cut and counted in one warning."""
    encoded = _encode_many(tokenizer, fmt, [(row[question_key], row[answer_key]) for row in rows]) if rows else []
    n_long = sum(len(ids) > max_len for ids, _ in encoded)
    if n_long:
        warnings.warn(f"{n_long} of {len(rows)} samples are longer than max_len={max_len} tokens and were truncated",
                      stacklevel=2)
    return [_cut(ids, n_prompt, max_len) for ids, n_prompt in encoded]


def target_rows(questions_from: Sequence[Mapping], answers: Sequence[str], seed: int = 0) -> list[dict]:
    """Forget questions paired with target answers (e.g. "I don't know" replies) for the targeted variant.

    Row i gets answers[k] for a deterministic pseudo-random k derived from seed.
    """
    import numpy as np

    if not answers:
        raise DataError("target answer pool is empty")
    picks = np.random.default_rng([seed, 0x7A4]).integers(0, len(answers), size=len(questions_from))
    return [{"question": row["question"], "answer": answers[int(k)]} for row, k in zip(questions_from, picks)]


def encode_text_prefix(tokenizer: Any, text: str, max_tokens: int) -> dict[str, list[int]]:
    """One raw text as open-unlearning's CompletionDataset encodes it (MUSE PrivLeak / MIA data).

    BOS when the tokenizer adds one, then the text's first max_tokens ids, no EOS; every position
    but the first is labelled (open-unlearning never labels index 0).
    """
    if max_tokens < 1:
        raise DataError(f"max_tokens={max_tokens} must be >= 1")
    head = [int(tokenizer.bos_token_id)] if tokenizer_adds_bos(tokenizer) else []
    ids = head + _ids(tokenizer, text)[:max_tokens]
    return {"input_ids": ids, "labels": [IGNORE] + ids[1:]}


def encode_texts(tokenizer: Any, texts: Sequence[str], max_len: int, add_bos: bool | None = None) -> list[dict]:
    """Raw documents (MUSE forget/retain text) -> examples of at most max_len tokens, every token scored.

    Each document is tokenised, EOS appended, and cut into consecutive chunks; each chunk starts
    with BOS when the tokenizer adds one (add_bos=None) or when add_bos is True.
    """
    bos = tokenizer_adds_bos(tokenizer) if add_bos is None else add_bos
    head = [int(tokenizer.bos_token_id)] if bos and tokenizer.bos_token_id is not None else []
    width = max_len - len(head)
    if width < 1:
        raise DataError(f"max_len={max_len} leaves no room for text tokens")
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for text in texts:
        ids = _ids(tokenizer, text) + ([int(eos)] if eos is not None else [])
        for start in range(0, len(ids), width):
            chunk = head + ids[start:start + width]
            out.append({"input_ids": chunk, "labels": [IGNORE] * len(head) + chunk[len(head):]})
    return out
