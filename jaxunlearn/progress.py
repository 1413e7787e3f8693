"""Training progress for people and for log files.

In a terminal: a tqdm bar per stage that stays on screen when the stage ends (leave=True).
Elsewhere (a batch job, `nohup`, CI): one plain line on stdout at the first step, then every
`every` seconds (env JAXUNLEARN_PROGRESS_SECONDS, default 30) and at the last step:

    memorize: step 12/40 (30%) loss 1.2345, 0.85 steps/s

stdout, not stderr, so that stderr keeps only errors (one line per failure).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

DEFAULT_SECONDS = 30.0


def progress_seconds() -> float:
    raw = os.environ.get("JAXUNLEARN_PROGRESS_SECONDS")
    try:
        value = float(raw) if raw else DEFAULT_SECONDS
    except ValueError:
        value = DEFAULT_SECONDS
    return value if value >= 0 else DEFAULT_SECONDS


class Progress:
    """update(step, loss) after every step; close() at the end."""

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        stream: TextIO | None = None,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool | None = None,
        silent: bool = False,
    ):
        """silent: show nothing (processes other than the first of a multi-process run)."""
        self.total, self.desc, self.clock, self.silent = total, desc, clock, silent
        self.stream = stream if stream is not None else sys.stdout
        self.every = progress_seconds() if every is None else every
        if terminal is None:
            terminal = sys.stderr.isatty()
        self.bar = None
        if terminal and not silent:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=True)
        self.start_step, self.start_time = initial, clock()
        self.last_time: float | None = None

    def update(self, step: int, loss: float | None = None) -> None:
        if self.silent:
            return
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")
            return
        now = self.clock()
        if self.last_time is None or now - self.last_time >= self.every or step == self.total:
            self.last_time = now
            elapsed = now - self.start_time
            rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
            loss_text = f" loss {loss:.4f}," if loss is not None else ""
            pct = 100 * step // max(self.total, 1)
            print(f"{self.desc}: step {step}/{self.total} ({pct}%){loss_text} {rate:.2f} steps/s",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
