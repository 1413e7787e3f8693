"""The paper's continual unlearning: forget01 -> forget05 -> forget10, each stage from the previous result.

    python experiments/paper/continual.py --model llama2chat=/ckpt/Llama-2-7b-chat-hf [--tofu-dir DIR] [--methods ...]
    python experiments/paper/continual.py --tiny

`jaxunlearn continual` runs every method through the three splits (RUN/1-forget01, 2-forget05, 3-forget10);
each stage's result model is evaluated on its split against that split's retain model. Writes
OUT/continual.md (one row per method and stage). Resumable: rerun the same command.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402


def main(argv=None) -> int:
    a = C.paper_args(__doc__.split("\n\n")[0], sys.argv[1:] if argv is None else argv, out="experiments/results/paper")
    p = C.Paper(a)
    text = ["# Continual unlearning forget01 -> forget05 -> forget10 (result model after each stage)\n"]
    for model in p.models:
        rows = []
        retain = {s: p.retain_model(model, s)[0] for s in C.TOFU_SPLITS}
        for method in a.methods:
            run = a.work / model / "continual" / C.slug(method)
            if not (run / f"{len(C.TOFU_SPLITS)}-{C.TOFU_SPLITS[-1]}" / "result.json").exists():
                p.run("continual", *C.METHODS[method], *p.data(model), *p.train(a.lr, a.epochs), "--run", run,
                      "--stages", *C.TOFU_SPLITS, "--reference", p.finetuned(model))
            for k, split in enumerate(C.TOFU_SPLITS, start=1):
                stage = run / f"{k}-{split}"
                s = p.tofu_eval(stage, run / "eval" / stage.name, C.get_method_name(stage), retain[split], "result")
                rows.append((f"{method}, {split}", s))
        text += [f"\n## {model}\n", C.table(rows, C.TOFU_COLUMNS, "method, stage")]
    C.write(a.out / ("continual_tiny.md" if a.tiny else "continual.md"), "".join(text))
    print(f"wrote {C.rel(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
