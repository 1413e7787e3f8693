"""One writer per run directory: RUN/.lock.

    with RunLock(run):          # raises RunLockedError at once if another process holds it
        ... train, write checkpoints ...

The lock is an advisory `fcntl.flock` on RUN/.lock, which the kernel releases when the
holding process ends in any way (exit, crash, SIGKILL), so a lock left by a killed process is
never stale: the next writer takes it over. The file records the holder (pid, host, command,
start time) for the message a second writer gets; it is left in place after release.

Where the file system does not support flock (some network mounts), the lock falls back to
the recorded holder: a lock recorded by a live process on this host, or by any process on
another host, is respected; one recorded by a dead process on this host is taken over.

Only the primary process (jax.process_index() == 0) of a multi-host run takes the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import socket
import sys
import time

from jaxunlearn.errors import JaxunlearnError, write_error

LOCK_FILE = ".lock"


class RunLockedError(JaxunlearnError, RuntimeError):
    """Another process is writing to this run directory."""


def _holder_text(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {when}: {info.get('command', '?')})"


def _read_holder(path: pathlib.Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive writer lock on a run directory (a context manager; also acquire()/release())."""

    def __init__(self, run: str | os.PathLike, command: str | None = None):
        self.run = pathlib.Path(run)
        self.path = self.run / LOCK_FILE
        self.command = command or " ".join(["jaxunlearn", *sys.argv[1:2]])
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        try:
            self.run.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.run, e, "into the run directory (lock file)") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLockedError(
                    f"{self.run}: run directory is in use by {_holder_text(_read_holder(self.path))}; "
                    "wait for it to finish or stop it, then rerun"
                ) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._check_recorded_holder()
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _check_recorded_holder(self) -> None:
        """Fallback without flock: respect a live (or remote) recorded holder."""
        info = _read_holder(self.path)
        pid, host = info.get("pid"), info.get("host")
        if not isinstance(pid, int) or pid == os.getpid():
            return
        if host != socket.gethostname() or pid_alive(pid):
            raise RunLockedError(
                f"{self.run}: run directory is in use by {_holder_text(info)}; wait for it to finish or stop it, "
                f"then rerun (if that process is gone, delete {self.path})"
            )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no holder recorded any more
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(run: str | os.PathLike, command: str | None = None):
    """RunLock on the primary process, a no-op context on the others."""
    import contextlib

    import jax

    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return RunLock(run, command)
