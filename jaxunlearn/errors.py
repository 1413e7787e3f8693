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
