"""Benchmarks (TOFU, MUSE, built-in synthetic), prompt formats, tokenisation and static-shape batching."""

from jaxunlearn.data.batching import (
    DEFAULT_BUCKETS,
    PairedIterator,
    bucket_ladder,
    bucket_length,
    collate,
    collate_prompts,
    host_slice,
    to_global,
)
from jaxunlearn.data.benchmark import DEFAULT_IDK, UnlearnBenchmark
from jaxunlearn.data.errors import DataError, DataFileNotFoundError
from jaxunlearn.data.prompts import (
    CHAT,
    LLAMA2_CHAT,
    QA,
    SYSTEM_PROMPT,
    PromptFormat,
    encode_pairs,
    encode_prompt,
    encode_qa,
    encode_rows,
    encode_texts,
    prompt_format_for,
    prompt_text,
    target_rows,
)
from jaxunlearn.data.muse import MUSE_HUB, MuseBenchmark, knowmem_prompt, load_muse, muse_benchmark
from jaxunlearn.data.synthetic import synthetic_benchmark, synthetic_tokenizer
from jaxunlearn.data.tofu import FORGET_SPLITS, TOFU_SPLITS, load_tofu, tofu_benchmark

__all__ = [
    "CHAT", "DEFAULT_BUCKETS", "DEFAULT_IDK", "FORGET_SPLITS", "LLAMA2_CHAT", "MUSE_HUB", "QA", "SYSTEM_PROMPT",
    "TOFU_SPLITS", "MuseBenchmark", "knowmem_prompt", "load_muse", "muse_benchmark", "load_tofu", "tofu_benchmark",
    "encode_texts",
    "DataError", "DataFileNotFoundError", "PairedIterator", "PromptFormat", "UnlearnBenchmark",
    "bucket_ladder", "bucket_length", "collate", "collate_prompts", "encode_pairs", "encode_prompt", "encode_qa",
    "encode_rows",
    "host_slice", "prompt_format_for", "prompt_text", "synthetic_benchmark", "synthetic_tokenizer",
    "target_rows", "to_global",
]
