"""The paper's MUSE-News table: VerbMem and KnowMem on the forget set, KnowMem on the retain set, PrivLeak.

    python experiments/paper/muse_news.py --model target=/ckpt/MUSE-news_target --muse-dir DIR
        [--retrain /ckpt/MUSE-news_retrain] [--methods ...]
    python experiments/paper/muse_news.py --tiny      # a tiny model fine-tuned on built-in data in MUSE's layout

Every method unlearns MUSE-News `raw/forget` (retain: `raw/retain1`) from the target model (an HF folder,
MUSE's Llama-2-7B trained on the news corpus). PrivLeak uses --retrain's privleak AUC when given (evaluated
here the same way), else MUSE's published retrained AUC. Writes OUT/muse_news.md. Resumable.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

EXTRA = {"--muse-dir": dict(help="MUSE-News in the hub's layout (<dir>/<subset>/<split>.jsonl)"),
         "--retrain": dict(help="HF folder of the model retrained without the forget set (for PrivLeak)")}


def main(argv=None) -> int:
    from jaxunlearn.data.batching import bucket_ladder

    a = C.paper_args(__doc__.split("\n\n")[0], sys.argv[1:] if argv is None else argv, out="experiments/results/paper",
                     extra=EXTRA)
    p = C.Paper(a)
    muse = C.tiny_muse_dir(a.work / "tiny-muse") if a.tiny else pathlib.Path(a.muse_dir or "")
    buckets = bucket_ladder(a.max_len, smallest=256)
    data = ["data.benchmark=muse", f"data.source={C.rel(muse)}", "data.corpus=news", f"data.max_len={a.max_len}",
            f"data.buckets=[{','.join(map(str, buckets))}]"]
    # evaluation lengths: VerbMem prompt + 128 generated tokens, PrivLeak BOS + 2048 text tokens
    ev_args = ["--benchmark", "muse", "--data-source", muse, "--muse-corpus", "news",
               "--max-len", "512" if a.tiny else "2304", "--batch-size", str(a.eval_batch)]
    text = ["# MUSE-News: VerbMem / KnowMem forget (lower = forgotten), KnowMem retain (utility), PrivLeak (0 ideal)\n"]
    for model, (folder, _, lr) in p.models.items():
        work = a.work / model / "muse_news"
        target = pathlib.Path(folder)
        if a.tiny:  # the tiny target: the random model fine-tuned on the forget and retain texts
            target = work / "target_hf"
            if not (target / "config.json").exists():
                p.run("finetune", f"model.hf_folder={folder}", *data, *p.train(lr, 4), "--run", work / "target",
                      "--split", "forget", "--hf-out", target)
        rows, retrain_auc = [], []
        if a.retrain:
            s = p.run.evaluate(pathlib.Path(a.retrain), work / "eval", "retrain", *ev_args, "--label", "retrain")
            rows.append(("Retrained", s))
            retrain_auc = ["--retrain-auc", str(s["privleak_auc"])]
        rows.insert(0, ("Original (target)", p.run.evaluate(target, work / "eval", "target", *ev_args, *retrain_auc,
                                                             "--label", "target")))
        for method in a.methods:
            if method == "MOX momentum" and "MOX" in a.methods:
                continue
            run = work / C.slug(method)
            extra = ("method.momentum=true",) if method == "MOX" else ()
            p.run.unlearn(run, target, [*C.METHODS[method], *extra, *data, *p.train(a.lr, a.epochs)])
            models = [("MOX α=4", ("forget", "--alpha", "4"), "alpha_4.0"), ("MOX momentum", ("result",), "mox")] \
                if method == "MOX" else [(method, ("result",), C.get_method_name(run))]
            for row, which, label in models:
                rows.append((row, p.run.evaluate(run, work / "eval" / run.name, label, "--which", *which, *ev_args,
                                                 *retrain_auc)))
        text += [f"\n## {model}\n", C.table(rows, C.MUSE_COLUMNS)]
    C.write(a.out / ("muse_news_tiny.md" if a.tiny else "muse_news.md"), "".join(text))
    print(f"wrote {C.rel(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
