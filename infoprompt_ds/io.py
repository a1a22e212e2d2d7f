"""Atomic writes: a reader (another rank, a resumed run, a person) sees the old file or the new one,
never a part. One helper for every file the project writes in place."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


# The names of the temporaries below: a write killed mid-way leaves one behind, and it is still ours.
TMP_NAME = re.compile(r"\..+\.tmp\d+(\.[0-9a-f]{8})?")


def _tmp_beside(path: Path) -> Path:
    # Same folder (same file system, so os.replace is atomic); unique per process and call, so ranks or
    # hosts writing the same file at once never share a temporary name.
    return path.with_name(f".{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for any writer that takes a path (to_csv, save_file, ...);
    once the block ends it is fsync'd and renamed over `path`; on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable too (POSIX); not possible everywhere, and not needed for safety."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data: Any, indent: int = 2, **dumps) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, **dumps))


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Write a folder under a temporary name and rename it into place only when everything is written."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
