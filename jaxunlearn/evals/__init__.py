"""Evaluation: TOFU / MUSE / membership-inference metrics, jitted scoring and KV-cache generation.

Modules:
  metrics    pure TOFU / MUSE formulas (probability, truth ratio and its scores, normalised
             probability, ROUGE-L, forget quality, model utility, KnowMem stop strings)
  mia        LOSS / ZLib / Min-K% / Min-K%++ scores, ROC AUC, PrivLeak (sign convention documented
             there), exact memorisation, extraction strength
  scoring    jitted teacher forcing: per-token log-probs, Min-K%++ z, argmax matches per bucket shape
  generate   jitted greedy decoding with the models' KV cache (left-padded, static shapes, EOS)
  evaluator  Evaluator: one model + tokenizer with its compiled functions and shardings
  tofu, muse pipelines producing JSON-ready summary and per-sample dicts
  report     markdown table, forget-quality vs model-utility plot, training-curve plot
  cli        `jaxunlearn eval`

Typical use:

    ev = Evaluator.create(graphdef, params, model_config, tokenizer, mesh=make_mesh())
    summary, per_sample = evaluate_tofu(ev, tofu_benchmark("forget10", source=DIR), retain_ratios)
"""
