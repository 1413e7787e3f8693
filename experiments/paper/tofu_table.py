"""The paper's TOFU table: every method on forget01/05/10 for each base model (FQ, MU, forget and retain ROUGE-L).

    python experiments/paper/tofu_table.py --model phi15=/ckpt/phi-1_5 --model llama2chat=/ckpt/Llama-2-7b-chat-hf \
        --model llama32=/ckpt/Llama-3.2-1B-Instruct [--tofu-dir DIR] [--splits forget01 forget05 forget10] \
        [--set model.dtype=bfloat16 train.grad_accum=4 train.batch_size=8]
    python experiments/paper/tofu_table.py --tiny          # random tiny model, built-in data (CI)

Per model: fine-tuned on TOFU full (the reference, 5 epochs at the paper's lr) and on each retain split (the
retain models); per split: every method from the reference (10 epochs, lr 1e-5, batch 32), evaluated against
that split's retain model. Writes OUT/tofu_table.md. Resumable: rerun the same command.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402


def main(argv=None) -> int:
    a = C.paper_args(__doc__.split("\n\n")[0], sys.argv[1:] if argv is None else argv,
                     out="experiments/results/paper",
                     extra={"--splits": dict(nargs="+", default=list(C.TOFU_SPLITS), choices=C.TOFU_SPLITS)})
    p = C.Paper(a)
    text = ["# TOFU: forget quality, model utility, forget / retain ROUGE-L (final epoch)\n"]
    for model in p.models:
        for split in a.splits:
            rows = p.method_summaries(model, split)
            text += [f"\n## {model}, {split}\n", C.table(rows.items(), C.TOFU_COLUMNS + C.MIA_COLUMNS)]
    C.write(a.out / ("tofu_table_tiny.md" if a.tiny else "tofu_table.md"), "".join(text))
    print(f"wrote {C.rel(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
