"""Errors raised by the data layer: one line naming the file (or hub split) and row at fault."""

from __future__ import annotations

from jaxunlearn.errors import JaxunlearnError


class DataError(JaxunlearnError, ValueError):
    """Bad benchmark data: unreadable file, malformed row, missing or empty field, empty split."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A split or file that should exist does not."""
