"""One name -> entry table for every extension point (objectives, methods, extrapolation rules,
decoder layouts, model families).

A `Registry` is a plain dict with two additions: `add` refuses a second entry under one name (two
modules claiming a name is a bug, not an override), and `lookup` turns a missing name into the
registry's own one-line error listing the known names.
"""

from __future__ import annotations

from typing import Any


class Registry(dict):
    def __init__(self, what: str, error: type[Exception]):
        super().__init__()
        self.what = what  # "objective", "extrapolation rule", ... as error messages name it
        self.error = error  # raised by lookup for an unknown name

    def add(self, name: str, entry: Any) -> Any:
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> Any:
        if name not in self:
            raise self.error(f"unknown {self.what} {name!r} (known: {', '.join(sorted(self))})")
        return self[name]
