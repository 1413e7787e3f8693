"""Bad input gives one-line DataErrors naming the file and row."""

import json

import pytest

from jaxunlearn.data import DataError, DataFileNotFoundError, load_tofu

GOOD = {"question": "Who?", "answer": "Me."}


def _write(folder, name, lines, binary=False):
    path = folder / name
    if binary:
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _error(folder, split="forget01", kind=DataError):
    with pytest.raises(kind) as info:
        load_tofu(split, folder)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    return message


def test_missing_file(tmp_path):
    message = _error(tmp_path, kind=DataFileNotFoundError)
    assert str(tmp_path) in message and "forget01.jsonl" in message
    assert isinstance(FileNotFoundError, type) and issubclass(DataFileNotFoundError, FileNotFoundError)
    message = _error(tmp_path / "nope", kind=DataFileNotFoundError)
    assert "nope" in message and "does not exist" in message


def test_missing_field(tmp_path):
    _write(tmp_path, "forget01.jsonl", [json.dumps(GOOD), json.dumps(GOOD), json.dumps({"question": "Q?"})])
    assert _error(tmp_path) == f"{tmp_path / 'forget01.jsonl'} line 3: missing field 'answer'"


def test_wrong_kinds_of_field(tmp_path):
    row = {**GOOD, "paraphrased_answer": "P.", "perturbed_answer": "not a list"}
    _write(tmp_path, "retain_perturbed.jsonl", [json.dumps(row)])
    assert "line 1: field 'perturbed_answer' should be a non-empty list" in _error(tmp_path, "retain_perturbed")
    _write(tmp_path, "full.jsonl", [json.dumps(GOOD), json.dumps({"question": "Q?", "answer": "  "})])
    assert _error(tmp_path, "full").endswith("full.jsonl line 2: field 'answer' is empty")
    _write(tmp_path, "holdout01.jsonl", [json.dumps(GOOD), "[1, 2]"])
    assert "holdout01.jsonl line 2 item 1: expected a JSON object" in _error(tmp_path, "holdout01")


def test_empty_split(tmp_path):
    (tmp_path / "forget01.jsonl").write_text("\n\n", encoding="utf-8")
    assert _error(tmp_path) == f"{tmp_path / 'forget01.jsonl'}: split 'forget01' has no rows"
    (tmp_path / "forget05.json").write_text("[]", encoding="utf-8")
    assert "split 'forget05' has no rows" in _error(tmp_path, "forget05")


def test_malformed_json_line(tmp_path):
    _write(tmp_path, "forget01.jsonl", [json.dumps(GOOD), json.dumps(GOOD), '{"question": "Q?", "answer"'])
    message = _error(tmp_path)
    assert message.startswith(f"{tmp_path / 'forget01.jsonl'} line 3: malformed JSON")
    _write(tmp_path, "forget05.json", [json.dumps(GOOD), "{oops"])
    assert "forget05.json line 2: malformed JSON" in _error(tmp_path, "forget05")


def test_malformed_pretty_printed_json_names_the_bad_line(tmp_path):
    # a .json array written with indent: the error is on line 5, not on line 1 (its "[")
    text = json.dumps([GOOD, GOOD], indent=1).splitlines()
    text[3] += ","  # a trailing comma closing the first object
    _write(tmp_path, "forget01.json", text)
    assert _error(tmp_path).startswith(f"{tmp_path / 'forget01.json'} line 5: malformed JSON")
    # JSON Lines in a .json file: still the bad line
    _write(tmp_path, "forget01.json", [json.dumps(GOOD), json.dumps(GOOD), "{oops"])
    assert _error(tmp_path).startswith(f"{tmp_path / 'forget01.json'} line 3: malformed JSON")


def test_non_utf8_bytes(tmp_path):
    _write(tmp_path, "forget01.jsonl", [json.dumps(GOOD).encode(), b'{"question": "caf\xe9?", "answer": "x"}'],
           binary=True)
    message = _error(tmp_path)
    assert message.startswith(f"{tmp_path / 'forget01.jsonl'} line 2: not valid UTF-8")


def test_corrupt_parquet_and_unknown_split(tmp_path):
    (tmp_path / "forget01.parquet").write_bytes(b"PAR1 this is not parquet")
    assert "forget01.parquet: cannot read Parquet" in _error(tmp_path)
    with pytest.raises(DataError, match="unknown TOFU split 'forget02'"):
        load_tofu("forget02", tmp_path)


def test_data_command_reports_one_line(tmp_path, tofu_dir, capsys):
    from jaxunlearn.cli import main

    assert main(["data", "tofu", "--forget-split", "forget01", "--source", str(tofu_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["forget"] == 40
    _write(tmp_path, "forget01.jsonl", [json.dumps(GOOD), "{"])
    assert main(["data", "tofu", "--forget-split", "forget01", "--source", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "forget01.jsonl line 2: malformed JSON" in err and "Traceback" not in err
