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
  130 / 143  stopped by SIGINT (Ctrl-C) / SIGTERM: a training command finishes the step in flight,
     writes a checkpoint and prints "interrupted at step N; rerun the same command to resume"
Every command but `plan` (which measures compile time) uses JAX's persistent compilation cache,
so a rerun skips compilation; see `jaxunlearn.compile_cache` (JAXUNLEARN_COMPILE_CACHE=DIR or off).
Set JAXUNLEARN_DEBUG=1 to get the traceback instead of the one line. Any other exception is a bug
and keeps its traceback.

Global options (before the command) join a multi-process run; see `jaxunlearn.distributed`:
    jaxunlearn [--coordinator HOST:PORT --num-processes N --process-id I] COMMAND [args...]
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
    "plan": ("jaxunlearn.plan", "main", "per-device memory, FLOPs and compile time of a train step (AOT)"),
}

NO_COMPILE_CACHE = {"plan"}  # reports compile time and memory of a fresh compilation

EXIT_ERROR = 1  # an expected failure (see the module docstring)
EXIT_USAGE = 2  # unknown command or bad options (argparse uses 2 too)


# global options -> keyword of jaxunlearn.distributed.initialize and the type of its value
CLUSTER_OPTIONS: dict[str, tuple[str, type]] = {
    "--coordinator": ("coordinator", str),
    "--num-processes": ("num_processes", int),
    "--process-id": ("process_id", int),
}


def _usage() -> str:
    lines = ["usage: jaxunlearn [--coordinator HOST:PORT --num-processes N --process-id I] COMMAND [options]",
             "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `jaxunlearn COMMAND --help` for a command's options.",
              "", "multi-process runs (GPU or CPU clusters; Cloud TPU is detected and needs none of these):",
              "  --coordinator HOST:PORT  address of process 0's coordinator (env JAXUNLEARN_COORDINATOR)",
              "  --num-processes N        processes in the run (env JAXUNLEARN_NUM_PROCESSES)",
              "  --process-id I           this process, 0..N-1 (env JAXUNLEARN_PROCESS_ID)"]
    return "\n".join(lines)


def split_cluster_options(argv: list[str]) -> tuple[dict, list[str]]:
    """Leading global options -> (initialize keywords, the rest of argv)."""
    found: dict = {}
    argv = list(argv)
    while argv and argv[0].split("=", 1)[0] in CLUSTER_OPTIONS:
        flag, eq, value = argv.pop(0).partition("=")
        if not eq:
            if not argv:
                raise ValueError(f"{flag}: missing value")
            value = argv.pop(0)
        key, kind = CLUSTER_OPTIONS[flag]
        try:
            found[key] = kind(value)
        except ValueError:
            raise ValueError(f"{flag}: expected {kind.__name__}, got {value!r}") from None
    return found, argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cluster, argv = split_cluster_options(argv)
    except ValueError as err:
        print(f"jaxunlearn: error: {err}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"jaxunlearn: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    module, func, _ = COMMANDS[name]
    from jaxunlearn.errors import JaxunlearnError
    from jaxunlearn.interrupt import Interrupted, interruptible

    try:
        if not {"-h", "--help"} & set(rest):
            from jaxunlearn import distributed

            distributed.initialize(**cluster)  # before the command touches any device
            if name not in NO_COMPILE_CACHE:
                from jaxunlearn import compile_cache

                compile_cache.enable()
        with interruptible():
            return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except Interrupted as err:
        if os.environ.get("JAXUNLEARN_DEBUG"):
            raise
        print(f"jaxunlearn {name}: {err}", file=sys.stderr)
        return err.exit_code
    except (JaxunlearnError, OSError) as err:
        if os.environ.get("JAXUNLEARN_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"jaxunlearn {name}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
