"""`jaxunlearn data`: load and validate a benchmark and print its split sizes as JSON.

  jaxunlearn data tofu [--forget-split forget10] [--source DIR|hf://ID]
  jaxunlearn data muse [--corpus news|books] [--source DIR|hf://ID]
  jaxunlearn data synthetic [--seed 0] [--n-entities 40] [--n-forget 4]

Bad data raises a DataError (one line on stderr and exit status 1 through jaxunlearn.cli).
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxunlearn data", description="validate a benchmark and print split sizes")
    sub = p.add_subparsers(dest="benchmark", required=True)
    t = sub.add_parser("tofu")
    t.add_argument("--forget-split", default="forget10")
    t.add_argument("--source", default=None, help="data folder or hf://<repo id> (default: the hub)")
    m = sub.add_parser("muse")
    m.add_argument("--corpus", default="news", choices=("news", "books"))
    m.add_argument("--source", default=None, help="data folder or hf://<repo id> (default: the hub)")
    s = sub.add_parser("synthetic")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-entities", type=int, default=40)
    s.add_argument("--n-forget", type=int, default=4)
    return p


def sizes(args: argparse.Namespace) -> dict:
    """Split name -> row count for the benchmark the arguments name."""
    from jaxunlearn.data import muse_benchmark, synthetic_benchmark, tofu_benchmark

    if args.benchmark == "tofu":
        return tofu_benchmark(args.forget_split, args.source).sizes()
    if args.benchmark == "muse":
        bench = muse_benchmark(args.corpus, args.source)
        out = {k: len(v) for k, v in vars(bench).items() if isinstance(v, list)}
        out.update({f"privleak_{k}": len(v) for k, v in bench.privleak.items()})
        return out
    return synthetic_benchmark(args.seed, n_entities=args.n_entities, n_forget=args.n_forget).sizes()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    print(json.dumps(sizes(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
