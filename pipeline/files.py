"""Files on disk: content hashes, the cache folder, staging folders that replace their target atomically, JSON
written atomically. Nothing here knows about models or formats.

A folder is written as a hidden staging sibling (`.NAME.partial-<id>`) and renamed into place only when complete:
its files and the folder itself are fsynced first, so after a crash or a power cut the name either points at the
old folder or at the complete new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    return Path(os.environ.get("WEIGHTSMITH_CACHE", Path.home() / ".cache" / "weightsmith")).expanduser()


_HASHES: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """The sha256 of a file's contents (remembered per path, size and modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, to disk."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in [*sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True), folder]:
        fsync_dir(path)


def readable_by_all(folder: Path) -> None:
    """Give every file under `folder` the modes a published artifact needs (rw-r--r--, scripts rwxr-xr-x): some
    writers (safetensors' `save_file`) create files readable by their owner only, which a server running as another
    user, or a copy to shared storage, cannot read."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            executable = path.stat().st_mode & 0o100
            path.chmod(0o755 if executable else 0o644)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_name(final: Path, kind: str = "partial") -> Path:
    return final.parent / f".{final.name}.{kind}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of `final`; on success it replaces `final`, on any error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(new: Path, final: Path) -> None:
    """Move `new` to `final` once it is on disk; an existing `final` is set aside first and deleted after the move."""
    fsync_tree(new)
    old = None
    if final.exists():
        old = staging_name(final, "old")
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Write `path` atomically: a temporary sibling, fsynced, renamed over it."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """JSON written atomically; NaN and infinities are refused (they are not JSON), naming where they are."""
    if bad := non_finite(data):
        raise ValueError(f"{path.name}: {bad} is not a finite number")
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def non_finite(data: Any, where: str = "") -> str | None:
    """The key path of the first NaN or infinity in nested dicts and lists, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or "value"
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return None
    for key, value in items:
        if found := non_finite(value, f"{where}.{key}" if where else str(key)):
            return found
    return None
