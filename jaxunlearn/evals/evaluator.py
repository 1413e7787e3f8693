"""One model + tokenizer, ready to score and generate: the compiled functions and their shardings.

    ev = Evaluator.create(graphdef, params, model_config, tokenizer, mesh=make_mesh())
    scores = ev.score_qa(rows)                  # list[SampleScore], teacher forced, answer tokens only
    texts = ev.generate_answers(questions, 200) # greedy, KV cache, EOS / stop strings

Compiled functions are cached per (kind, max_new_tokens), and jit keeps one executable per shape (one
scoring width, the bucket of the longest example; one generation prompt width), so evaluating several
splits (or several models with the same graphdef) reuses them.
With a mesh, parameters are placed by their logical axes (`jaxunlearn.sharding`), batches are
split over ("data", "fsdp"), and the batch size is rounded up to a multiple of the batch shards.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import jax

from jaxunlearn.data.batching import bucket_ladder
from jaxunlearn.evals import generate as gen_mod
from jaxunlearn.evals.scoring import SampleScore, make_score_fn, score_examples
from jaxunlearn.ops import IGNORE

DEFAULT_EVAL_BUCKETS = bucket_ladder(2048)


@dataclass
class Evaluator:
    """Scoring and generation for one set of parameters (see module docstring)."""

    graphdef: Any
    params: Any
    model_config: Any
    tokenizer: Any
    fmt: Any
    batch_size: int = 16
    buckets: Sequence[int] = DEFAULT_EVAL_BUCKETS
    max_len: int = 512
    param_shardings: Any = None
    batch_sharding: Any = None
    cache_dtype: str = "float32"
    _fns: dict = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, graphdef, params, model_config, tokenizer, fmt=None, mesh=None, batch_size: int = 16,
               **kw) -> "Evaluator":
        """Build from split parameters; with a mesh, place them on it (by logical axes)."""
        from jaxunlearn.data import prompt_format_for

        fmt = prompt_format_for(tokenizer) if fmt is None else fmt
        p_shard = b_shard = None
        if mesh is not None:
            from jaxunlearn.models import param_logical_axes
            from jaxunlearn.sharding import batch_shards, batch_sharding, param_shardings

            p_shard = param_shardings(param_logical_axes(params), mesh, params)
            b_shard = batch_sharding(mesh)
            shards = batch_shards(mesh)
            batch_size = -(-batch_size // shards) * shards
            params = jax.device_put(params, p_shard)
        return cls(graphdef, params, model_config, tokenizer, fmt, batch_size=batch_size,
                   param_shardings=p_shard, batch_sharding=b_shard, **kw)

    def with_params(self, params) -> "Evaluator":
        """The same compiled functions for other parameters of the same model (e.g. another alpha)."""
        if self.param_shardings is not None:
            params = jax.device_put(params, self.param_shardings)
        out = Evaluator(**{**self.__dict__, "params": params})
        out._fns = self._fns
        return out

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def eos_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return None if eos is None else int(eos)

    # ------------------------------------------------------------------ teacher forcing
    def _score_fn(self) -> Callable:
        if "score" not in self._fns:
            from jaxunlearn.models import make_apply

            self._fns["score"] = make_score_fn(make_apply(self.graphdef), self.param_shardings, self.batch_sharding)
        return self._fns["score"]

    def score_examples(self, examples: Sequence[Mapping]) -> list[SampleScore]:
        """Teacher-forced scores of encoded examples (dict input_ids, labels)."""
        if not examples:
            return []
        empty = [i for i, e in enumerate(examples) if not any(t != IGNORE for t in e["labels"][1:])]
        if empty:
            raise ValueError(f"example {empty[0]} has no scored token (its prompt fills max_len={self.max_len}); "
                             "raise max_len")
        return score_examples(self._score_fn(), self.params, examples, self.batch_size, self.pad_id,
                              self.buckets, self.batch_sharding, self._shares_contexts(examples, self.buckets))

    def _shares_contexts(self, examples: Sequence[Mapping], buckets: Sequence[int]) -> bool:
        """Whether examples may share their context in a row: not when a sliding-window layer's window is
        shorter than a row (the window counts row slots, and a shared context sits further back there)."""
        from jaxunlearn.data.batching import bucket_length

        windows = [w for w in getattr(self.model_config, "layer_windows", ()) if w]
        return not windows or min(windows) >= bucket_length(max(len(e["input_ids"]) for e in examples), buckets)

    def encode_qa(self, question: str, answer: str) -> dict:
        from jaxunlearn.data import encode_qa

        return encode_qa(self.tokenizer, self.fmt, question, answer, self.max_len)

    def score_qa(self, pairs: Sequence[tuple[str, str]]) -> list[SampleScore]:
        """Scores of (question, answer) pairs, answer tokens (and EOS) only."""
        from jaxunlearn.data import encode_pairs

        return self.score_examples(encode_pairs(self.tokenizer, self.fmt, pairs, self.max_len))

    def score_texts(self, texts: Sequence[str], max_tokens: int) -> list[SampleScore]:
        """Scores of raw texts, every token after the first scored, each cut to its first max_tokens
        tokens (`jaxunlearn.data.encode_text_prefix`); one extra bucket when they exceed the largest."""
        from jaxunlearn.data.prompts import encode_text_prefix

        examples = [encode_text_prefix(self.tokenizer, t, max_tokens) for t in texts]
        if not examples:
            return []
        longest = max(len(e["input_ids"]) for e in examples)
        buckets = tuple(self.buckets)
        if longest > max(buckets):
            buckets += (max_tokens + 1,)
        return score_examples(self._score_fn(), self.params, examples, self.batch_size, self.pad_id,
                              buckets, self.batch_sharding, self._shares_contexts(examples, buckets))

    # ------------------------------------------------------------------ generation
    def _gen_fn(self, max_new_tokens: int) -> Callable:
        key = ("gen", int(max_new_tokens))
        if key not in self._fns:
            from jaxunlearn.models import init_cache, make_decode

            new_cache = functools.partial(init_cache, self.model_config, dtype=self.cache_dtype)
            self._fns[key] = gen_mod.make_generate_fn(make_decode(self.graphdef), new_cache, max_new_tokens,
                                                      self.eos_id, self.pad_id, self.param_shardings,
                                                      self.batch_sharding)
        return self._fns[key]

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if not prompts:
            return []
        return gen_mod.generate_tokens(self._gen_fn(max_new_tokens), self.params, prompts, self.batch_size,
                                       self.pad_id, self.eos_id, self.buckets, self.batch_sharding)

    def generate_texts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       stop_strings: Sequence[str] = ()) -> list[str]:
        """Greedy continuations of token-id prompts, decoded and cut at stop strings."""
        return gen_mod.decode_texts(self.tokenizer, self.generate_ids(prompts, max_new_tokens), stop_strings)

    def generate_answers(self, questions: Sequence[str], max_new_tokens: int,
                         stop_strings: Sequence[str] = ()) -> list[str]:
        """Greedy answers to questions in the evaluator's prompt format."""
        from jaxunlearn.data import encode_prompt

        prompts = [encode_prompt(self.tokenizer, self.fmt, q) for q in questions]
        return self.generate_texts(prompts, max_new_tokens, stop_strings)
