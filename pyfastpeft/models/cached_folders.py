"""Folders made from a source file and kept under ``$PYFASTPEFT_CACHE``: a GGUF file's Hugging Face
conversion (``hf/``) and its config and tokenizer (``gguf-metadata/``).

A folder is written whole or not at all: into a temporary sibling first, its mark file last (naming the
source file, its size and modification time), then renamed into place. Each folder's name is keyed by
the source's size and modification time, so a replaced source gets a new folder and the old one could
never be read again: once a new folder is in place, the folders beside it whose source is gone or has
changed since are removed (a converted SmolLM2-135M is 517 MB), and so are temporary folders a killed
process left behind more than a day ago. Folders whose source is still there, unchanged, are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# a temporary folder older than this is a killed writer's (a conversion takes about a minute)
STALE_TEMPORARY_SECONDS = 24 * 3600


def source_stamp(source: Path) -> dict:
    """What a mark records of its source file: the path, size and modification time."""
    st = source.stat()
    return {"gguf": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_folder(folder: Path, mark: str, source: Path, fill: Callable[[Path], dict | None]) -> list[tuple[Path, int]]:
    """Makes ``folder`` by ``fill(temporary folder)`` (which may return more entries for the mark), marks
    it with ``source``'s stamp and renames it into place; then removes the stale folders beside it.
    Returns the folders removed, with their sizes in bytes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        extra = fill(tmp) or {}
        (tmp / mark).write_text(json.dumps({**source_stamp(source), **extra}) + "\n")
        if folder.exists():  # another process finished first, or an unmarked leftover
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prune_stale(folder.parent, mark, keep=folder)


def is_stale(folder: Path, mark: str) -> bool:
    """Whether the marked ``folder``'s source file is gone, or has another size or modification time than
    the mark records (a mark without them: only a missing source counts). Unmarked folders are not."""
    try:
        recorded = json.loads((folder / mark).read_text())
    except (OSError, ValueError):
        return False
    source = recorded.get("gguf") if isinstance(recorded, dict) else None
    if not isinstance(source, str):
        return False
    try:
        st = Path(source).stat()
    except OSError:
        return True
    if "size" in recorded and "mtime_ns" in recorded:
        return (st.st_size, st.st_mtime_ns) != (recorded["size"], recorded["mtime_ns"])
    return False


def prune_stale(parent: Path, mark: str, keep: Path | None = None, now: float | None = None) -> list[tuple[Path, int]]:
    """Removes the folders in ``parent`` (but ``keep``) whose source is gone or changed, and temporary
    folders (``.name.*``) untouched for over a day. Returns what it removed, with the sizes in bytes;
    what cannot be removed (read-only) stays."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry == keep or not entry.is_dir() or entry.is_symlink():
            continue
        if entry.name.startswith("."):
            try:
                stale = now - entry.stat().st_mtime > STALE_TEMPORARY_SECONDS
            except OSError:
                continue
        else:
            stale = is_stale(entry, mark)
        if stale:
            size = folder_bytes(entry)
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append((entry, size))
    return removed


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder`` (what can be read of them)."""
    total = 0
    for f in folder.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:
            pass
    return total
