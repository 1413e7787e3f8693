"""The `jaxunlearn` console command: dispatches `jaxunlearn SUBCOMMAND [args...]`.

Each subcommand lives in its own module and is imported only when used, so that
`jaxunlearn --help` is fast and one module's import cost does not slow the others.
A subcommand is a function `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("jaxunlearn.demo", "main", "end-to-end MOX on the built-in benchmark (CPU-sized)"),
    "finetune": ("jaxunlearn.runner", "finetune_main", "train a reference/retain model on a benchmark split"),
    "unlearn": ("jaxunlearn.runner", "unlearn_main", "unlearn with MOX (default) or a baseline"),
    "extrapolate": ("jaxunlearn.runner", "extrapolate_main", "write forget models for given alphas from a run"),
    "export-hf": ("jaxunlearn.runner", "export_hf_main", "export a run's parameters as a Hugging Face folder"),
    "eval": ("jaxunlearn.evals.cli", "main", "evaluate a run directory or a Hugging Face folder"),
    "data": ("jaxunlearn.data.cli", "main", "validate a benchmark and print its split sizes"),
    "plan": ("jaxunlearn.plan", "main", "per-device memory, FLOPs and compile time of a train step (AOT)"),
}

# Expected failures (bad config, bad data, missing files, hash mismatches, non-finite losses) are raised
# as these types with a message naming what is wrong; the CLI prints that one line and exits non-zero.
# Set JAXUNLEARN_DEBUG=1 to see the full traceback instead.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def _usage() -> str:
    lines = ["usage: jaxunlearn COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `jaxunlearn COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"jaxunlearn: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except USER_ERRORS as err:
        if os.environ.get("JAXUNLEARN_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"jaxunlearn {name}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
