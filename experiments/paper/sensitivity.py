"""The paper's sensitivity sweeps: MOX's alpha (one memorisation run) and the momentum eta (one run each).

    python experiments/paper/sensitivity.py --model phi15=/ckpt/phi-1_5 [--split forget10]
        [--alphas 0.5 1 2 4 8] [--etas 0.2 0.4 0.6 0.675 0.8]
    python experiments/paper/sensitivity.py --tiny

Alpha: `jaxunlearn extrapolate` writes every alpha from the MOX run of tofu_table.py (the same WORK folder
reuses it). Eta: a momentum run per eta (the running forget model depends on eta, the memorisation does not).
Writes OUT/sensitivity.md. Resumable: rerun the same command.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

EXTRA = {"--split": dict(default="forget10", choices=C.TOFU_SPLITS),
         "--alphas": dict(type=float, nargs="+", default=list(C.MOX_ALPHAS)),
         "--etas": dict(type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.675, 0.8])}


def main(argv=None) -> int:
    a = C.paper_args(__doc__.split("\n\n")[0], sys.argv[1:] if argv is None else argv, out="experiments/results/paper",
                     extra=EXTRA)
    p = C.Paper(a)
    text = [f"# MOX sensitivity on TOFU {a.split}\n"]
    for model in p.models:
        retain, _ = p.retain_model(model, a.split)
        ev = a.work / model / a.split / "eval"
        run = p.unlearn(model, a.split, "MOX", ("method.momentum=true",))
        p.run("extrapolate", "--run", run, "--alpha", *a.alphas)
        alphas = [(f"{x:g}", p.tofu_eval(run, ev / "mox", f"alpha_{float(x)}", retain, "forget", "--alpha", str(x)))
                  for x in a.alphas]
        etas = []
        for eta in a.etas:
            r = p.unlearn(model, a.split, "MOX momentum", (f"method.eta={eta}",), name=f"mox_momentum_eta_{eta:g}")
            etas.append((f"{eta:g}", p.tofu_eval(r, ev / r.name, "mox", retain, "result")))
        text += [f"\n## {model}: alpha (linear extrapolation)\n", C.table(alphas, C.TOFU_COLUMNS, "alpha"),
                 f"\n## {model}: eta (momentum, alpha 4)\n", C.table(etas, C.TOFU_COLUMNS, "eta")]
    C.write(a.out / ("sensitivity_tiny.md" if a.tiny else "sensitivity.md"), "".join(text))
    print(f"wrote {C.rel(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
