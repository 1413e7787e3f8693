"""Greedy generation (jitted, KV cache, left-padded batches) token-identical to transformers' greedy
`generate(do_sample=False)` on tiny random HF models loaded through jaxunlearn.models.load_hf."""

import functools

import numpy as np
import pytest
import torch

from jaxunlearn.evals import generate as G
from jaxunlearn.models import init_cache, load_hf, make_decode, split_params

VOCAB, PAD, N_NEW = 96, 0, 12
PROMPT_LENGTHS = (3, 9, 6, 1, 12)


def _hf_model(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                  pad_token_id=PAD)
    if kind == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, **common)
        cls = tf.LlamaForCausalLM
    else:
        cfg = tf.PhiConfig(num_key_value_heads=4, partial_rotary_factor=0.5, **common)
        cls = tf.PhiForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so argmaxes are not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(hf, prompts, eos):
    out = []
    for p in prompts:  # one unpadded prompt at a time: the plainest reference
        ids = torch.tensor([p])
        with torch.no_grad():
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_NEW,
                              eos_token_id=eos, pad_token_id=PAD)
        out.append(G.trim_at_eos(seq[0, len(p):].tolist(), eos))
    return out


@pytest.mark.parametrize("kind", ["llama", "phi"])
def test_greedy_matches_transformers(kind, prompts, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    graphdef, params = split_params(model)
    # The stop token: one that the first prompt's greedy continuation produces mid-way, so that
    # some rows stop early (a random model rarely picks the configured EOS by itself).
    hf.generation_config.eos_token_id = None
    eos = _hf_greedy(hf, prompts[:1], None)[0][N_NEW // 3]
    want = _hf_greedy(hf, prompts, eos)

    new_cache = functools.partial(init_cache, model.config)
    gen = G.make_generate_fn(make_decode(graphdef), new_cache, N_NEW, eos, PAD)
    got = G.generate_tokens(gen, params, prompts, batch_size=4, pad_id=PAD, eos_id=eos, buckets=(16,))

    assert got == want
    assert any(len(w) < N_NEW for w in want), "test should cover early EOS"
    assert any(len(w) == N_NEW for w in want), "test should cover running to max_new_tokens"
