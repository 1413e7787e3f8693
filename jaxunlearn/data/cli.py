"""`jaxunlearn data`: load and validate a benchmark and print its split sizes as JSON.

  jaxunlearn data [CONFIG.yaml | RUN] [key=value ...]     the run configuration's `data` section
  jaxunlearn data tofu [--forget-split forget10] [--source DIR|hf://ID]
  jaxunlearn data muse [--corpus news|books] [--source DIR|hf://ID]
  jaxunlearn data synthetic [--seed 0] [--n-entities 20] [--n-forget 4]

The first form reads the benchmark as every other command does: a YAML config (or a run directory's
config.yaml) and dotted overrides such as `data.benchmark=tofu data.source=DIR`; with neither, the
config defaults (the built-in synthetic benchmark). The benchmark is looked up in
jaxunlearn.data.benchmarks and loaded with every split its evaluation uses. The other forms are the
older per-benchmark flags; their defaults are the config's.

Bad data raises a DataError (one line on stderr and exit status 1 through jaxunlearn.cli).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

LEGACY = ("tofu", "muse", "synthetic")


def _legacy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxunlearn data", description="validate a benchmark and print split sizes")
    sub = p.add_subparsers(dest="benchmark", required=True)
    t = sub.add_parser("tofu")
    t.add_argument("--forget-split", default=None)
    t.add_argument("--source", default=None, help="data folder or hf://<repo id> (default: the hub)")
    m = sub.add_parser("muse")
    m.add_argument("--corpus", default=None, choices=("news", "books"))
    m.add_argument("--source", default=None, help="data folder or hf://<repo id> (default: the hub)")
    s = sub.add_parser("synthetic")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--n-entities", type=int, default=None)
    s.add_argument("--n-forget", type=int, default=None, help="authors to forget: 1, 2 or 4 (forget01/05/10)")
    return p


def _config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxunlearn data", description="validate a benchmark and print split sizes",
                                epilog=f"or the older form: jaxunlearn data {{{','.join(LEGACY)}}} [flags] "
                                       "(see `jaxunlearn data tofu --help`)")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml | RUN] [key=value ...]",
                   help="optional YAML config (or run directory) followed by dotted key=value overrides")
    return p


# legacy flag -> the data.KEY override it stands for
_LEGACY_KEYS = {"forget_split": "forget_split", "source": "source", "corpus": "corpus", "seed": "synthetic_seed",
                "n_entities": "synthetic_entities"}


def _legacy_overrides(args: argparse.Namespace) -> list[str]:
    from jaxunlearn.data.benchmarks import SYNTHETIC_FORGET
    from jaxunlearn.data.errors import DataError

    out = [f"data.benchmark={args.benchmark}"]
    out += [f"data.{key}={getattr(args, flag)}" for flag, key in _LEGACY_KEYS.items()
            if getattr(args, flag, None) is not None]
    n_forget = getattr(args, "n_forget", None)
    if n_forget is not None:
        splits = {n: split for split, n in SYNTHETIC_FORGET.items()}
        if n_forget not in splits:
            raise DataError(f"--n-forget: the synthetic benchmark forgets {', '.join(map(str, splits))} authors "
                            f"({', '.join(splits.values())}), got {n_forget}")
        out.append(f"data.forget_split={splits[n_forget]}")
    return out


def data_config(argv: list[str]):
    """The DataSpec the command line names (either form)."""
    from jaxunlearn.config import ConfigError, load_config

    if argv and argv[0] in LEGACY:
        return load_config(None, _legacy_overrides(_legacy_parser().parse_args(argv))).data
    args = _config_parser().parse_args(argv).args
    path = None
    if args and "=" not in args[0]:
        path, args = pathlib.Path(args[0]), args[1:]
        if path.is_dir():
            path = path / "config.yaml"
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ConfigError(f"expected key=value overrides after the config file, got {bad}")
    return load_config(path, args).data


def sizes(spec) -> dict:
    """Split name -> row count of the benchmark a DataSpec names, loaded as for evaluation."""
    from jaxunlearn.data.benchmarks import load

    return load(spec, "eval").sizes()


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(sizes(data_config(list(sys.argv[1:] if argv is None else argv)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
