"""Relearning attack (the paper's WMDP experiment, on TOFU): fine-tune each forget model briefly on the
forget set and measure how much of the forgotten answers comes back.

    python experiments/paper/relearn.py --model phi15=/ckpt/phi-1_5 [--split forget10] [--relearn-steps 10]
    python experiments/paper/relearn.py --tiny

Each method's final model (the runs of tofu_table.py, reused from the same WORK folder) is exported
(`jaxunlearn export-hf`) and fine-tuned on the forget split for --relearn-steps steps at --relearn-lr
(linear decay, no warm-up); forget ROUGE-L, forget probability and forget quality before and after.
WMDP itself (multiple-choice hazardous knowledge) is not bundled; the attack is the same procedure.
Writes OUT/relearn.md. Resumable: rerun the same command.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

EXTRA = {"--split": dict(default="forget10", choices=C.TOFU_SPLITS),
         "--relearn-steps": dict(type=int, default=10), "--relearn-lr": dict(type=float, default=1e-5)}
COLUMNS = (("forget ROUGE", ("forget", "rouge")), ("forget prob", ("forget", "prob")), ("FQ", ("forget_quality",)),
           ("MU", ("model_utility",)))


def main(argv=None) -> int:
    a = C.paper_args(__doc__.split("\n\n")[0], sys.argv[1:] if argv is None else argv, out="experiments/results/paper",
                     extra=EXTRA)
    p = C.Paper(a)
    lr = 1e-3 if a.tiny else a.relearn_lr
    text = [f"# Relearning attack: {a.relearn_steps} fine-tuning steps on {a.split} (lr {lr:g})\n"]
    for model in p.models:
        retain, _ = p.retain_model(model, a.split)
        rows = []
        for row, run, which, label in p.method_models(model, a.split):
            base = a.work / model / a.split / "relearn" / C.slug(row).replace("α=", "alpha_")
            before = p.tofu_eval(run, a.work / model / a.split / "eval" / run.name, label, retain, *which)
            if not (base / "export" / "config.json").exists():
                p.run("export-hf", "--run", run, "--which", *which, "--out", base / "export")
            over = [f"model.hf_folder={C.rel(base / 'export')}", *p.data(model, a.split), *p.train(lr, 1),
                    "train.warmup_epochs=0", f"train.max_steps={a.relearn_steps}"]
            p.run.finetune(base / "relearned", "forget", over)
            after = p.tofu_eval(base / "relearned", base / "eval", "reference", retain, "reference")
            rows += [(f"{row}, before", before), (f"{row}, after relearning", after)]
        text += [f"\n## {model}\n", C.table(rows, COLUMNS)]
    C.write(a.out / ("relearn_tiny.md" if a.tiny else "relearn.md"), "".join(text))
    print(f"wrote {C.rel(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
