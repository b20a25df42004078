"""Output storage addressed by URL: a local folder (the default, or a mount every worker shares), or any fsspec URL
(`s3://bucket/prefix` with s3fs installed, `gs://...` with gcsfs, `file:///...`).

The steps always read and write a local folder. For a URL output that folder is a mirror in the weightsmith cache:
a target's artifact is pulled from the storage before a step and pushed after it, so a worker on another machine
(a step handed to the `cuda` or `apple` pool) finds what the previous step made. Object stores have no atomic
rename, so a push uploads every file, then the manifest, then removes stored files the artifact no longer has; a
pull checks every file it downloads against the stored manifest's sha256, so a reader (a resumed run, another
worker) never takes a half-uploaded folder for a complete one. A pull lands in a staging folder that replaces the
mirror's only when complete, and refuses a manifest naming a path outside its folder (absolute, or with `..`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath

from pipeline.files import cache_root, file_sha256, staging_dir
from pipeline.types import MANIFEST, InputError

log = logging.getLogger("weightsmith")


def is_url(output: str) -> bool:
    return "://" in output


def check_url(output: str) -> None:
    """Raise ValueError naming the package to install when no fsspec backend serves `output`'s scheme."""
    import fsspec

    protocol = output.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"no storage backend for {protocol}:// ({exc})") from None


def mirror(output: str) -> Path:
    """The local folder that stands for the URL `output` on this machine."""
    return cache_root() / "outputs" / hashlib.sha256(output.encode()).hexdigest()[:16]


def _remote(output: str, *parts: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    return fs, "/".join([root.rstrip("/"), *parts])


def _stored_manifest(fs, where: str) -> str | None:
    try:
        return fs.cat_file(f"{where}/{MANIFEST}").decode("utf-8")
    except FileNotFoundError:
        return None


def _same(local: Path, stored: str | None) -> bool:
    return (
        stored is not None
        and (local / MANIFEST).is_file()
        and json.loads(stored) == json.loads((local / MANIFEST).read_text(encoding="utf-8"))
    )


def pull(output: str, model: str, folder: str) -> None:
    """Bring the stored artifact `model/folder` into the mirror, unless the mirror already has that manifest or
    the storage has no complete artifact there."""
    if not is_url(output):
        return
    local = mirror(output) / model / folder
    fs, where = _remote(output, model, folder)
    stored = _stored_manifest(fs, where)
    if stored is None or _same(local, stored):
        return
    entries = json.loads(stored)["files"]
    for entry in entries:
        safe_path(entry["path"], f"{output}/{model}/{folder}/{MANIFEST}")
    try:
        with staging_dir(local) as tmp:
            for entry in entries:
                target = tmp / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{where}/{entry['path']}", str(target))
                if file_sha256(target) != entry["sha256"]:
                    raise Incomplete(entry["path"])
            (tmp / MANIFEST).write_text(stored, encoding="utf-8")
    except Incomplete as exc:  # a push cut off mid-way: files newer than the manifest stored there
        log.warning("%s/%s/%s: %s does not match its manifest (an upload was cut off): not taken", output, model,
                    folder, exc)  # fmt: skip


class Incomplete(Exception):
    pass


class StorageError(InputError):
    """Stored data that must not be used as it is (a path leaving its folder)."""


def safe_path(path: str, where: str) -> PurePosixPath:
    """A file path from a stored manifest, refused unless it stays inside its artifact folder."""
    parts = PurePosixPath(path)
    if not path or parts.is_absolute() or ".." in parts.parts or "\\" in path:
        raise StorageError(f"{where} names the file {path!r}, which leaves its artifact folder: refused")
    return parts


def push(output: str, model: str, folder: str) -> None:
    """Upload the mirror's `model/folder` to the storage: the files, then the manifest, then remove stored files the
    artifact no longer has; nothing to do when both manifests agree. A reader that finds files newer than the stored
    manifest (an upload cut off) sees their hashes differ and does not take them (`pull`)."""
    if not is_url(output):
        return
    local = mirror(output) / model / folder
    fs, where = _remote(output, model, folder)
    if not (local / MANIFEST).is_file():  # gone here (a candidate that was published or dropped): gone there too
        if fs.exists(where):
            fs.rm(where, recursive=True)
        return
    if _same(local, _stored_manifest(fs, where)):
        return
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != MANIFEST)
    for name in files:
        fs.makedirs(f"{where}/{name}".rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local / name), f"{where}/{name}")
    fs.put_file(str(local / MANIFEST), f"{where}/{MANIFEST}")
    for stored in fs.find(where):
        if stored.removeprefix(where.rstrip("/") + "/") not in [*files, MANIFEST]:
            fs.rm_file(stored)


def push_files(output: str, model: str, names: list[str]) -> None:
    """Upload run-level files of the mirror's `model` folder (summary, report)."""
    if not is_url(output):
        return
    fs, where = _remote(output, model)
    fs.makedirs(where, exist_ok=True)
    for name in names:
        fs.put_file(str(mirror(output) / model / name), f"{where}/{name}")
