"""Crash-safe writes: build under a temporary name beside the target, then rename into place.

An interrupted or failed write (disk full, killed process) leaves the previous version, or nothing, at the
target path; never a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import uuid
from typing import Any, Iterator

from sdd.errors import UserError

# ".<name>.tmp-<host>-<pid>-<8 hex>": who is writing it, so a later run can tell a live writer from a dead one
# (names without the host were written by earlier versions, on this machine)
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<host>[A-Za-z0-9_.]+)-)?(?P<pid>\d+)-[0-9a-f]{8}$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path (file or folder) to write; on success it replaces ``path`` atomically.

    On failure the temporary is removed; a failed write (disk full, no permission: see ``write_failure``)
    becomes one ``UserError`` line naming ``path`` and the reason, other errors pass through.
    """
    with reporting_write_failures(path, "write"):
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
    except BaseException as err:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        reason = write_failure(err, path) if isinstance(err, Exception) and not isinstance(err, UserError) else None
        if reason is None:
            raise
        raise UserError(f"could not write {path}: {reason} (nothing partial was left in place)") from None


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


# --- strict JSON ---------------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any, **kwargs) -> str:
    """Strict JSON (RFC 8259) of ``value``: NaN and infinities, which ``json.dumps`` writes as the invalid
    tokens ``NaN``/``Infinity``, become ``null``. Every JSON the project writes goes through here."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def write_json(path: str, value: Any) -> None:
    """``value`` as indented strict JSON at ``path``, written atomically."""
    write_text(path, to_json(value, indent=2, ensure_ascii=False) + "\n")


# --- output folders and write failures -----------------------------------------------------------------------


def check_writable_dir(path: str, key: str = "output_dir") -> None:
    """Raise a one-line ``UserError`` unless ``path`` is a folder, or can be made one, that this process can write.

    Nothing is created: the nearest existing ancestor is probed with a temporary file (``os.access`` says yes to
    root on a read-only mount).
    """
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise UserError(f"{key}: {path} exists and is not a folder")
    probe = full
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"{key}: cannot create {path}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".write-check-")
        os.close(fd)
        os.remove(name)
    except OSError as err:
        raise UserError(f"{key}: cannot write in {probe}: {err.strerror or err}") from None


# safetensors (Rust): 'Error while serializing: I/O error: No space left on device (os error 28)' or
# 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
_RUST_IO = re.compile(r'message: "([^"]+)"|I/O error: (.+?) \(os error \d+\)')
# torch's zip writer (torch.save) on a full disk: 'basic_ios::clear: iostream error', '[enforce fail at
# inline_container.cc:...] . unexpected pos ...', '... PytorchStreamWriter failed writing file ...'
_TORCH_WRITER = ("iostream error", "inline_container", "PytorchStreamWriter", "file write failed")


def write_failure(err: BaseException, path: str | None = None) -> str | None:
    """The reason when ``err`` (or an error it was raised from) is a failed write, else ``None``.

    Covers ``OSError``, safetensors' ``SafetensorError`` and torch's zip writer, whose messages do not say why;
    for those, a nearly full disk under ``path`` is named as the likely reason.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current.strerror or str(current) or type(current).__name__
        text = " ".join(str(current).split())
        if type(current).__name__ == "SafetensorError":
            match = _RUST_IO.search(text)
            return (match.group(1) or match.group(2)) if match else text[:200]
        if isinstance(current, RuntimeError) and any(marker in text for marker in _TORCH_WRITER):
            return _disk_hint(path) or f"torch could not write the file ({text[:120]})"
        current = current.__cause__ or current.__context__
    return None


def _disk_hint(path: str | None, threshold: int = 16 << 20) -> str | None:
    """'No space left on device (N bytes free)' when the disk holding ``path`` has less than ``threshold``."""
    if not path:
        return None
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None
    return f"No space left on device ({free} bytes free)" if free < threshold else None


@contextlib.contextmanager
def reporting_write_failures(path: str, what: str) -> Iterator[None]:
    """Turn a failed write inside (disk full, no permission, ...) into one ``UserError`` line naming ``path``.

    Use it around writes that clean up after themselves (``atomic_path`` does, and reports by itself).
    """
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        reason = write_failure(err, path)
        if reason is None:
            raise
        raise UserError(f"{what}: could not write {path}: {reason}") from None


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporaries that ``atomic_path`` writers on this machine left behind when they died
    (``.pipeline.tmp-<host>-<pid>-*``, ...) in ``folder`` and its direct subfolders; return what was removed.

    A temporary whose process is still alive, or that another machine wrote, is left alone.
    """
    removed: list[str] = []
    if not os.path.isdir(folder):
        return removed
    host = _host()
    folders = [folder] + [os.path.join(folder, d) for d in sorted(os.listdir(folder))
                          if not d.startswith(".") and os.path.isdir(os.path.join(folder, d))]
    for where in folders:
        for name in sorted(os.listdir(where)):
            match = _TMP_RE.match(name)
            if not match or match.group("host") not in (None, host) or _alive(int(match.group("pid"))):
                continue
            path = os.path.join(where, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
