"""Cached folders made from a source file: written whole or not at all, and the ones whose source is gone
or has changed removed once a new one is in place."""

from __future__ import annotations

import json
import os
import time

import pytest

from pyfastpeft.models import cached_folders
from pyfastpeft.models.cached_folders import is_stale, prune_stale, source_stamp, write_folder

MARK = "mark.json"


def marked(parent, name, record) -> object:
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "data.bin").write_bytes(b"x" * 1000)
    (folder / MARK).write_text(json.dumps(record))
    return folder


def test_write_folder_marks_the_folder_and_leaves_no_temporary(tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"gguf")
    folder = tmp_path / "cache" / "m-1"

    def fill(tmp):
        (tmp / "config.json").write_text("{}")
        return {"seconds": 1.5}

    assert write_folder(folder, MARK, source, fill) == []
    record = json.loads((folder / MARK).read_text())
    assert record == {**source_stamp(source), "seconds": 1.5}
    assert record["gguf"] == str(source) and record["size"] == 4
    assert (folder / "config.json").is_file()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["m-1"]


def test_a_failed_fill_leaves_nothing(tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"gguf")
    folder = tmp_path / "cache" / "m-1"

    def fill(tmp):
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder(folder, MARK, source, fill)
    assert list(folder.parent.iterdir()) == []


def test_prune_removes_what_can_never_be_read_again_and_keeps_the_rest(tmp_path):
    parent = tmp_path / "hf"
    same = tmp_path / "same.gguf"
    same.write_bytes(b"1234")
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(b"1234")
    changed_stamp = source_stamp(changed)
    changed.write_bytes(b"123456")  # replaced since its folder was made
    kept = marked(parent, "same-a", source_stamp(same))
    gone = marked(parent, "gone-b", {"gguf": str(tmp_path / "deleted.gguf"), "size": 4, "mtime_ns": 1})
    replaced = marked(parent, "changed-c", changed_stamp)
    old_format = marked(parent, "old-d", {"gguf": str(same)})  # path only: kept while the file exists
    old_gone = marked(parent, "old-e", {"gguf": str(tmp_path / "deleted.gguf")})
    unmarked = parent / "unmarked-f"
    unmarked.mkdir()
    damaged = parent / "damaged-g"
    damaged.mkdir()
    (damaged / MARK).write_text("{not json")
    old_tmp = parent / ".x-1.abc"
    old_tmp.mkdir()
    (old_tmp / "half.bin").write_bytes(b"half")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old_tmp, (two_days_ago, two_days_ago))
    fresh_tmp = parent / ".x-2.def"  # a conversion running in another process
    fresh_tmp.mkdir()
    (parent / "a-file").write_text("not a folder")
    keep_stale = marked(parent, "new-h", {"gguf": str(tmp_path / "deleted.gguf")})

    removed = prune_stale(parent, MARK, keep=keep_stale)

    assert sorted(p.name for p, _ in removed) == sorted(p.name for p in (gone, replaced, old_gone, old_tmp))
    sizes = {p.name: size for p, size in removed}
    assert sizes[old_tmp.name] == 4  # the bytes that were freed, measured before the removal
    assert sizes[gone.name] == 1000 + len(
        json.dumps({"gguf": str(tmp_path / "deleted.gguf"), "size": 4, "mtime_ns": 1})
    )
    left = sorted(p.name for p in parent.iterdir())
    want = [kept, old_format, unmarked, damaged, fresh_tmp, keep_stale, parent / "a-file"]
    assert left == sorted(p.name for p in want)
    assert not is_stale(kept, MARK) and is_stale(keep_stale, MARK)


def test_a_new_folder_removes_its_stale_neighbours(tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"first")
    parent = tmp_path / "cache"
    first = parent / "m-1"
    write_folder(first, MARK, source, lambda tmp: None)
    source.write_bytes(b"second, longer")  # the file replaced: the next folder has another key
    removed = write_folder(parent / "m-2", MARK, source, lambda tmp: None)
    assert [p for p, _ in removed] == [first]
    assert sorted(p.name for p in parent.iterdir()) == ["m-2"]


def test_an_unreadable_parent_prunes_nothing(tmp_path, monkeypatch):
    assert prune_stale(tmp_path / "missing", MARK) == []
    monkeypatch.setattr(cached_folders, "STALE_TEMPORARY_SECONDS", 0)
    young = tmp_path / ".y.1"
    young.mkdir()
    assert [p for p, _ in prune_stale(tmp_path, MARK, now=time.time() + 1)] == [young]
