"""Greedy answers of a model fine-tuned in the "qa" format from "...Answer:" vs "...Answer: " prompts.

    jaxunlearn finetune experiments/configs/demo_finetune.yaml --run /tmp/ref --split full
    python experiments/bench/prompt_trailing_space.py /tmp/ref [--rows 100] [--new-tokens 32]

Prints the mean ROUGE-L recall (TOFU's ROUGE) of the answers against the true answers for both
prompt endings, on the run's benchmark (`full` rows, which the model was trained on).
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    from jaxunlearn import data, rundir
    from jaxunlearn.data.prompts import encode_prompt, prompt_text
    from jaxunlearn.evals import metrics as M
    from jaxunlearn.evals.evaluator import Evaluator

    run = pathlib.Path(args.run)
    cfg, _ = rundir.run_setup(run)
    bench = rundir.load_benchmark(cfg.data)
    tok = rundir.run_tokenizer(run)
    fmt = data.prompt_format_for(tok, cfg.data.prompt_format)
    setup, params, _ = rundir.load_run_params(run, which="reference")
    ev = Evaluator(setup.graphdef, params, setup.model_cfg, tok, fmt, batch_size=32,
                   buckets=tuple(cfg.data.buckets), max_len=cfg.data.max_len)
    rows = bench.full[: args.rows]
    plain = [encode_prompt(tok, fmt, r["question"]) for r in rows]
    bos = [tok.bos_token_id] if fmt.add_bos else []
    spaced = [bos + tok(prompt_text(tok, fmt, r["question"]) + " ", add_special_tokens=False)["input_ids"] for r in rows]
    print("prompt tails:", tok.convert_ids_to_tokens(plain[0][-3:]), "vs", tok.convert_ids_to_tokens(spaced[0][-3:]))
    for name, prompts in (("'Answer:'", plain), ("'Answer: '", spaced)):
        outs = ev.generate_texts(prompts, args.new_tokens)
        rouge = [M.rouge_l_recall(o, r["answer"]) for o, r in zip(outs, rows)]
        print(f"prompt ending {name:12s} ROUGE-L recall {np.mean(rouge):.3f}  e.g. {outs[0]!r}")


if __name__ == "__main__":
    main()
