"""--data files: parsing, tokenization, clear errors with line numbers, training on them."""

from __future__ import annotations

import json

import pytest

from pyfastpeft.train.data import (
    BYTE_SPECIALS,
    ByteTokenizer,
    DataError,
    FileSource,
    read_records,
    tokenize_records,
)

from .conftest import TINY, adapter, run_cli


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo ✓"
    ids = tok.encode(text)
    assert min(ids) >= 4 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text


def test_prompt_completion_labels_cover_the_completion_only(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "c"}, {"text": "xyz"}, ""])
    records = read_records(f)
    assert [r[0] for r in records] == [1, 2]
    ex = tokenize_records(records, ByteTokenizer(), 64, BYTE_SPECIALS)
    # BOS a b SEP | c EOS
    assert ex[0].labels == [-100, -100, -100, -100, ord("c") + 4, 3]
    assert ex[1].labels == ex[1].input_ids  # plain text: every token is predicted


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"text": "ok"', "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": "only a prompt"}', 'expected {"text": str}'),
        ('{"text": 3}', 'expected {"text": str}'),
    ],
)
def test_bad_line_names_its_number(tmp_path, bad, message):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, "", bad])
    with pytest.raises(DataError, match=rf"d.jsonl:3: .*{message[:12]}"):
        read_records(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_records(tmp_path / "empty.txt")


def test_held_out_split(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("".join(f"line {i}\n" for i in range(25)))
    src = FileSource(f, ByteTokenizer(), 32, BYTE_SPECIALS, pad_id=0)
    assert len(src.train) == 23 and len(src.held_out) == 2


def test_finetune_on_a_jsonl_file(tmp_path):
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(30)]
    data = _jsonl(tmp_path / "add.jsonl", rows)
    out = tmp_path / "out"
    assert run_cli("finetune", "--data", data, "--steps", "3", "--out", out, *TINY) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric_name"] == "token accuracy" and summary["completed"]
    assert adapter(out)


def test_bad_data_through_the_cli_writes_nothing(tmp_path, capsys):
    data = _jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, "{oops"])
    out = tmp_path / "out"
    assert run_cli("finetune", "--data", data, "--out", out, *TINY) == 2
    assert "bad.jsonl:3: not valid JSON" in capsys.readouterr().err
    assert not out.exists()
    assert run_cli("finetune", "--data", tmp_path / "nope.txt", "--out", out, *TINY) == 2
    assert "no such file" in capsys.readouterr().err
