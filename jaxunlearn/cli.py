"""The `jaxunlearn` console command: dispatches `jaxunlearn SUBCOMMAND [args...]`.

Each subcommand lives in its own module and is imported only when used, so that
`jaxunlearn --help` is fast and one module's import cost does not slow the others.
A subcommand is a function `main(argv: list[str]) -> int` that raises on failure.

Exit status (the one exit path of every command):
  0  success
  1  an expected failure: a `jaxunlearn.errors.JaxunlearnError` (bad config, data, checkpoint,
     non-finite step, ...) or an OS error (missing file, permission, disk full); stderr gets one
     line `jaxunlearn CMD: error: MESSAGE`, and checkpoints already written are kept
  2  a usage error (unknown command, bad or missing options)
Set JAXUNLEARN_DEBUG=1 to get the traceback instead of the one line. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("jaxunlearn.demo", "main", "end-to-end MOX on the built-in benchmark (CPU-sized)"),
    "finetune": ("jaxunlearn.runner", "finetune_main", "train a reference/retain model on a benchmark split"),
    "unlearn": ("jaxunlearn.runner", "unlearn_main", "unlearn with method=NAME (default mox; see README methods)"),
    "continual": ("jaxunlearn.runner", "continual_main", "unlearn forget splits in sequence, each from the last result"),
    "extrapolate": ("jaxunlearn.runner", "extrapolate_main", "write forget models for given alphas from a run"),
    "export-hf": ("jaxunlearn.runner", "export_hf_main", "export a run's parameters as a Hugging Face folder"),
    "eval": ("jaxunlearn.evals.cli", "main", "evaluate a run directory or a Hugging Face folder"),
    "data": ("jaxunlearn.data.cli", "main", "validate a benchmark and print its split sizes"),
}

EXIT_ERROR = 1  # an expected failure (see the module docstring)
EXIT_USAGE = 2  # unknown command or bad options (argparse uses 2 too)


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
        return EXIT_USAGE
    module, func, _ = COMMANDS[name]
    from jaxunlearn.errors import JaxunlearnError

    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except (JaxunlearnError, OSError) as err:
        if os.environ.get("JAXUNLEARN_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"jaxunlearn {name}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
