"""Stopping a command cleanly on SIGTERM (preemption, `kill`) and SIGINT (Ctrl-C).

`deferred_signals()` (used by train.train_loop) turns both signals into a flag that the loop checks
between steps; the loop then raises `Interrupted(signum, state)` and the training stage writes a
checkpoint of that state. `interruptible()` (used by the CLI around every command) makes SIGTERM
raise `Interrupted` like Ctrl-C does, outside the loop. The CLI prints the exception's one line,
"interrupted at step N; rerun the same command to resume", and exits with 128 + signal number
(143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any


class Interrupted(BaseException):
    """SIGTERM / SIGINT stopped a command; `.state` is the TrainState after the last finished step
    (None when the signal arrived outside the training loop). A BaseException, like
    KeyboardInterrupt, so that `except Exception` clauses do not swallow it."""

    def __init__(self, signum: int, state: "Any" = None):
        self.signum = signum
        self.state = state
        where = f"at step {state.step}" if state is not None else "before the next checkpoint"
        super().__init__(f"interrupted {where}; rerun the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    signum: int | None = None


@contextlib.contextmanager
def _handling(handler):
    """`handler` for SIGTERM and SIGINT within the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred_signals():
    """Within the block SIGTERM/SIGINT set the yielded flag; a second one raises Interrupted."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.signum is not None:
            raise Interrupted(signum)
        flag.signum = signum

    with _handling(handler):
        yield flag


def _raise(signum, frame):
    raise Interrupted(signum)


def interruptible():
    """Within the block SIGTERM and SIGINT raise Interrupted (no state), as Ctrl-C raises KeyboardInterrupt."""
    return _handling(_raise)
