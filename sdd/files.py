"""Crash-safe writes: build under a temporary name beside the target, then rename into place.

An interrupted or failed write (disk full, killed process) leaves the previous version, or nothing, at the
target path; never a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from typing import Iterator


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path (file or folder) to write; on success it replaces ``path`` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if os.path.isdir(tmp):
            if os.path.isdir(path):
                old = _tmp_name(path)
                os.replace(path, old)  # folders cannot be replaced in one step: move the old one aside
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        elif os.path.exists(tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            raise FileNotFoundError(f"nothing was written to the temporary path for {path}")
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
