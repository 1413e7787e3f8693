"""Prompt formats token for token against direct reimplementations of TOFU's and open-unlearning's encoding.

No real Llama / Phi tokenizer is available offline, so two tiny stand-ins are trained here with
`tokenizers`, each with the behaviour that matters at the prompt/answer boundary:
  phi-like    byte-level BPE as GPT-2 / Phi (a space attaches to the next word, a trailing space is
              a token of its own, no BOS added; BOS = EOS = <|endoftext|>)
  llama-like  SentencePiece-style Metaspace pieces ("▁" starts a word, BOS <s> added by
              add_special_tokens=True, EOS </s>)
TOFU: locuslab/tofu data_module.py convert_raw_data_to_model_format + config/model_config.yaml
(phi: "Question: ", "\n", "Answer: "; llama2-7b: "[INST] ", " [/INST]", "").
open-unlearning: src/data/utils.py preprocess_chat_instance + configs/model/phi-1_5.yaml,
Llama-2-7b-hf.yaml ("Question: ", "\n", "Answer: ") and Llama-2-7b-chat-hf.yaml ("[INST] ", " [/INST]", "").
"""

import pytest

from jaxunlearn.data.prompts import LLAMA2_CHAT, QA, encode_prompt, encode_qa, prompt_format_for
from jaxunlearn.ops import IGNORE

ROWS = [
    ("Who wrote the Silver River?", "The Silver River was written by Ana Lopez."),
    ("Where was Basil Mahfouz born?", "Basil Mahfouz was born in Cairo, Egypt."),
    ("What genre does Ana write?", "Ana writes mostly historical fiction."),
]
WORDS = " ".join(q + " " + a for q, a in ROWS) + " Question: Answer: [INST] [/INST]"
MAX_LEN = 128

TOFU_TAGS = {"qa": ("Question: ", "\n", "Answer: "), "llama2-chat": ("[INST] ", " [/INST]", "")}
# open-unlearning: (user_start_tag, user_end_tag, asst_start_tag)
OU_TAGS = {"qa": ("Question: ", "\n", "Answer: "), "llama2-chat": ("[INST] ", " [/INST]", "")}


def _train(pre_tokenizer, decoder, specials, alphabet=()):
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE(unk_token=specials[-1]))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=2, special_tokens=specials, show_progress=False,
                                  initial_alphabet=list(alphabet))
    # tags and QA words separated by spaces: no merge learns to span "[/INST]" and an answer
    tok.train_from_iterator([WORDS] * 2, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def phi_tok():
    from tokenizers import decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), ["<|endoftext|>"],
                 pre_tokenizers.ByteLevel.alphabet())
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def llama_tok():
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = _train(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                 decoders.Metaspace(replacement="▁", prepend_scheme="first"), ["<s>", "</s>", "<unk>"], ["\n"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def tofu_encode(tok, family, q, a):
    """TOFU convert_raw_data_to_model_format without its padding: (input_ids, labels)."""
    start, end, answer_tag = TOFU_TAGS[family]
    new_question = start + q + end
    full_text = new_question + answer_tag + a
    n_question = len(tok.tokenize(new_question, add_special_tokens=True))
    ids = tok(full_text, add_special_tokens=True)["input_ids"]
    labels = ids + [tok.eos_token_id]  # TOFU appends EOS to the labels (its input there is the EOS pad)
    labels = [IGNORE] * n_question + labels[n_question:]
    return ids + [tok.eos_token_id], labels


def ou_encode(tok, family, q, a):
    """open-unlearning preprocess_chat_instance (apply_chat_template False, no few-shot): (input_ids, labels)."""
    user_start, user_end, asst_start = OU_TAGS[family]
    prompt = user_start + q + user_end + asst_start
    chat_ids = tok(prompt + a, add_special_tokens=True, max_length=MAX_LEN, truncation=True)["input_ids"]
    prompt_ids = tok(prompt, add_special_tokens=True, max_length=MAX_LEN, truncation=True)["input_ids"]
    if chat_ids[-1] != tok.eos_token_id:
        chat_ids = chat_ids + [tok.eos_token_id]
    return chat_ids, [IGNORE] * len(prompt_ids) + chat_ids[len(prompt_ids):], prompt_ids


def _scored(labels):
    return [i for i, t in enumerate(labels) if t != IGNORE]


@pytest.mark.parametrize("tok_name", ["phi_tok", "llama_tok"])
def test_qa_format_matches_tofu_and_open_unlearning(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    fmt = prompt_format_for(tok, "qa")
    assert fmt.add_bos == (tok_name == "llama_tok")  # Phi adds no BOS, Llama does
    for q, a in ROWS:
        ours = encode_qa(tok, fmt, q, a, MAX_LEN)
        t_ids, t_labels = tofu_encode(tok, "qa", q, a)
        o_ids, o_labels, o_prompt = ou_encode(tok, "qa", q, a)
        # the same token ids: BOS (Llama only), "Question: {q}\nAnswer: {a}", EOS
        assert ours["input_ids"] == t_ids == o_ids
        # TOFU scores "Answer:" too; we score from the answer's first token (" {a}", space included);
        # open-unlearning's prompt ends in "Answer: ", whose lone space token is where the answer's
        # first token stands in the joint encoding, so it scores from the answer's second token
        ours_pos, tofu_pos = _scored(ours["labels"]), _scored(t_labels)
        n_extra = len(tofu_pos) - len(ours_pos)
        assert n_extra > 0 and tofu_pos[n_extra:] == ours_pos
        assert tok.decode([t_ids[i] for i in tofu_pos[:n_extra]]).strip() == "Answer:"
        assert _scored(o_labels) == _scored(ours["labels"])[1:]
        assert [ours["labels"][i] for i in _scored(ours["labels"])] == ours["input_ids"][-len(_scored(ours["labels"])):]
        # generation prompt: ours ends at "Answer:"; open-unlearning's ends with a lone-space token
        # that never occurs in a training example encoded our way (the answer's first token carries
        # the space), which is why a trailing space after "Answer:" derails generation for models
        # trained in this format
        prompt = encode_prompt(tok, fmt, q)
        assert o_prompt[:-1] == prompt
        assert tok.convert_ids_to_tokens(o_prompt[-1]) in ("Ġ", "▁")
        assert o_prompt[-1] not in ours["input_ids"]


def test_llama2_chat_format_matches_tofu_and_open_unlearning(llama_tok):
    tok = llama_tok
    fmt = prompt_format_for(tok, "llama2-chat")
    assert fmt == LLAMA2_CHAT.__class__(**{**LLAMA2_CHAT.__dict__, "add_bos": True})
    for q, a in ROWS:
        ours = encode_qa(tok, fmt, q, a, MAX_LEN)
        t_ids, t_labels = tofu_encode(tok, "llama2-chat", q, a)
        o_ids, o_labels, o_prompt = ou_encode(tok, "llama2-chat", q, a)
        # "<s>[INST] {q} [/INST]{a}</s>", answer and EOS scored: identical in all three
        assert ours["input_ids"] == t_ids == o_ids
        assert ours["labels"] == t_labels == o_labels
        assert ours["input_ids"][0] == tok.bos_token_id and ours["input_ids"][-1] == tok.eos_token_id
        # generation prompt "<s>[INST] {q} [/INST]" (TOFU re-tokenises the same string with BOS)
        assert encode_prompt(tok, fmt, q) == o_prompt == tok(f"[INST] {q} [/INST]")["input_ids"]


def test_format_texts():
    assert QA.prompt_template.format(q="Q?") + QA.answer_template.format(a="A.") == "Question: Q?\nAnswer: A."
    assert QA.prompt_template.format(q="Q?") == "Question: Q?\nAnswer:"
    assert LLAMA2_CHAT.prompt_template.format(q="Q?") + LLAMA2_CHAT.answer_template.format(a="A.") == "[INST] Q? [/INST]A."
