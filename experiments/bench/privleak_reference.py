"""PrivLeak of a model that unlearned nothing: the demo's reference on its own forget vs holdout rows.

    jaxunlearn finetune experiments/configs/demo_finetune.yaml --run /tmp/ref --split full
    python experiments/bench/privleak_reference.py /tmp/ref

The reference was fine-tuned on `full` (forget included), never on `holdout`. Each row becomes
the text "Question: {q}\\nAnswer: {a}" and is scored as MUSE PrivLeak texts are
(`jaxunlearn.evals.muse`); PrivLeak is printed against a retrained AUC of 0.5 and against MUSE's
published News value. MUSE's sign: about -100 for a model that still knows the forget set.
"""

from __future__ import annotations

import argparse
import pathlib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    args = ap.parse_args()

    from jaxunlearn import data, rundir
    from jaxunlearn.evals import mia
    from jaxunlearn.evals.evaluator import Evaluator
    from jaxunlearn.evals.muse import min_k_scores

    run = pathlib.Path(args.run)
    cfg, _ = rundir.run_setup(run)
    bench = rundir.load_benchmark(cfg.data)
    tok = rundir.run_tokenizer(run)
    setup, params, _ = rundir.load_run_params(run, which="reference")
    ev = Evaluator(setup.graphdef, params, setup.model_cfg, tok, data.prompt_format_for(tok, "qa"), batch_size=32,
                   buckets=tuple(cfg.data.buckets), max_len=cfg.data.max_len)

    def texts(rows):
        return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]

    f, h = min_k_scores(ev, texts(bench.forget)), min_k_scores(ev, texts(bench.holdout))
    auc = mia.privleak_auc(f, h)
    print(f"{len(f)} forget vs {len(h)} holdout rows: privleak_auc {auc:.4f} (open-unlearning AUC {1 - auc:.4f})")
    for name, retrain in (("0.5", 0.5), ("MUSE News 0.4772", mia.MUSE_RETRAIN_AUC["news"])):
        print(f"PrivLeak vs retrain AUC {name}: {mia.priv_leak(auc, retrain):.1f}")


if __name__ == "__main__":
    main()
