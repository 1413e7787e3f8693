"""The one exception base of jaxunlearn.

Every expected failure (bad config, bad data, missing or mismatched checkpoint, non-finite
training step, unknown method/objective/rule) raises a subclass of `JaxunlearnError` whose message
is one line naming the file / key / row at fault. The `jaxunlearn` command (jaxunlearn.cli) turns
these into `jaxunlearn CMD: error: MESSAGE` on stderr and exit status 1; anything else is a bug and
keeps its traceback. Subclasses also derive from the matching built-in type (ValueError,
FileNotFoundError, ...), so callers that catch those keep working.
"""

from __future__ import annotations


class JaxunlearnError(Exception):
    """Base of every expected (user-facing) jaxunlearn error."""


class RunError(JaxunlearnError, ValueError):
    """A run cannot go ahead as asked (missing run directory argument, bad split, unusable combination)."""


class WriteError(JaxunlearnError, OSError):
    """Writing into a run directory failed (disk full, read-only, permissions); what was already
    there is unchanged and nothing half-written looks complete."""


def write_error(where, e: BaseException, what: str) -> WriteError:
    """One-line WriteError for a failed write of `what` at `where`, naming the cause plainly
    (Orbax/TensorStore report a full disk as RESOURCE_EXHAUSTED, not as an OSError)."""
    import errno

    text = str(e)
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or "RESOURCE_EXHAUSTED" in text or "No space left" in text:
        cause, code = "no space left on device", errno.ENOSPC
    elif code == errno.EROFS or "Read-only file system" in text:
        cause, code = "read-only file system", errno.EROFS
    elif code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        cause = "permission denied"
    else:
        cause = " ".join(text.split())[:300] or type(e).__name__
    err = WriteError(f"{where}: cannot write {what}: {cause}; files already in the run directory are unchanged; "
                     "free space or fix permissions, then rerun the same command")
    err.errno = code
    return err


def is_write_failure(e: BaseException) -> bool:
    """An OSError, or Orbax/TensorStore's wrapping of one (a ValueError naming the cause)."""
    text = str(e)
    return isinstance(e, OSError) or any(k in text for k in ("RESOURCE_EXHAUSTED", "Read-only file system",
                                                            "No space left", "Permission denied"))
