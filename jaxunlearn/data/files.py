"""Reading rows from local JSON / JSONL / Parquet / plain-text files, and validating them.

Every row keeps a location string ("path line 17", "path row 3", "hub locuslab/TOFU[full] row 9")
so that a validation error names the file and row. Rows are numbered from 1.

Accepted layouts:
  .jsonl  one JSON object per line (blank lines skipped); a line may also hold a JSON array of
          objects, which is how `datasets.Dataset.to_json(lines=False)` batches its output.
  .json   a JSON array of objects, a column dict {field: [values...]}, or JSON Lines.
  .parquet  read with pyarrow.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from jaxunlearn.data.errors import DataError, DataFileNotFoundError

RECORD_EXTS = ("jsonl", "json", "parquet")
HUB_PREFIX = "hf://"


@dataclass(frozen=True)
class Rows:
    """Rows read from one source, with a location label per row."""

    source: str
    rows: list[dict]
    where: list[str]


def find_split_file(folder: pathlib.Path, name: str, exts: Sequence[str] = RECORD_EXTS) -> pathlib.Path:
    """The file `<folder>/<name>.<ext>` for the first ext that exists."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataFileNotFoundError(f"{folder}: data folder does not exist")
    for ext in exts:
        path = folder / f"{name}.{ext}"
        if path.is_file():
            return path
    tried = ", ".join(f"{name}.{ext}" for ext in exts)
    raise DataFileNotFoundError(f"{folder}: no file for split {name!r} (looked for {tried})")


def _decode(path: pathlib.Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFileNotFoundError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err.strerror})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte {data[err.start]:#04x} at offset {err.start})") from None


def read_text_lines(path: str | pathlib.Path) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file."""
    path = pathlib.Path(path)
    lines = [line.strip() for line in _decode(path).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path}: file has no lines")
    return lines


def _json_lines(path: pathlib.Path, text: str) -> Rows:
    rows, where = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {line_no}: malformed JSON ({err.msg} at column {err.colno})") from None
        items = value if isinstance(value, list) else [value]
        for k, item in enumerate(items):
            label = f"{path} line {line_no}" + (f" item {k + 1}" if isinstance(value, list) else "")
            if not isinstance(item, dict):
                raise DataError(f"{label}: expected a JSON object, got {type(item).__name__}")
            rows.append(item)
            where.append(label)
    return Rows(str(path), rows, where)


def _json_document(path: pathlib.Path, value: Any) -> Rows:
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: column lists have different lengths {sorted(lengths)}")
        keys = list(value)
        rows = [{k: value[k][i] for k in keys} for i in range(lengths.pop())]
    elif isinstance(value, list):
        rows = value
    else:
        raise DataError(f"{path}: expected a JSON array of objects or a column dict, got {type(value).__name__}")
    where = [f"{path} row {i + 1}" for i in range(len(rows))]
    for row, label in zip(rows, where):
        if not isinstance(row, dict):
            raise DataError(f"{label}: expected a JSON object, got {type(row).__name__}")
    return Rows(str(path), list(rows), where)


def _parquet(path: pathlib.Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read Parquet ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return Rows(str(path), rows, [f"{path} row {i + 1}" for i in range(len(rows))])


def read_records(path: str | pathlib.Path) -> Rows:
    """Rows of a .jsonl / .json / .parquet file (see module docstring)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(f"{path}: file not found")
    if path.suffix == ".parquet":
        return _parquet(path)
    text = _decode(path)
    if path.suffix == ".json":
        try:
            return _json_document(path, json.loads(text))
        except json.JSONDecodeError as err:
            # "Extra data": a first value parsed and more follow, i.e. JSON Lines, which reports its bad
            # line; any other error is inside the first value (e.g. an indented array): report it here
            if err.msg != "Extra data":
                raise DataError(f"{path} line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    return _json_lines(path, text)


def rows_from_records(source: str, records: Iterable[Mapping]) -> Rows:
    """Wrap in-memory rows (e.g. a `datasets.Dataset`) with "source row N" labels."""
    rows = [dict(r) for r in records]
    return Rows(source, rows, [f"{source} row {i + 1}" for i in range(len(rows))])


def is_hub(source: str | pathlib.Path | None) -> bool:
    """Whether a benchmark `source` names the hub (None or "hf://<repo id>") rather than a folder."""
    return source is None or (isinstance(source, str) and source.startswith(HUB_PREFIX))


def hub_rows(label: str, load: Callable[[], Iterable[Mapping]]) -> Rows:
    """Rows of a hub dataset loaded by `load()`; any loading failure is one DataError naming `label`."""
    try:
        ds = load()
    except Exception as err:  # network, cache and hub errors come in many types
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"{label}: cannot load ({type(err).__name__}: {first})") from None
    return rows_from_records(label, ds)


# Field kinds for validate(): "str" a non-empty string, "str_list" a non-empty list of non-empty strings.
def _check_field(label: str, row: dict, key: str, kind: str) -> None:
    if key not in row or row[key] is None:
        raise DataError(f"{label}: missing field {key!r}")
    value = row[key]
    if kind == "str":
        if not isinstance(value, str):
            raise DataError(f"{label}: field {key!r} should be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{label}: field {key!r} is empty")
    elif kind == "str_list":
        if not isinstance(value, (list, tuple)) or not value:
            raise DataError(f"{label}: field {key!r} should be a non-empty list of strings")
        for k, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise DataError(f"{label}: field {key!r} item {k + 1} should be a non-empty string")
    else:
        raise ValueError(f"unknown field kind {kind!r}")


def validate(rows: Rows, schema: Mapping[str, str], split: str) -> list[dict]:
    """Check every row has the schema's fields with the right kinds; return the rows.

    An empty split is an error. Extra fields are kept.
    """
    if not rows.rows:
        raise DataError(f"{rows.source}: split {split!r} has no rows")
    for row, label in zip(rows.rows, rows.where):
        for key, kind in schema.items():
            _check_field(label, row, key, kind)
    return rows.rows
