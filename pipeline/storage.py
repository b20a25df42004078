"""Output storage addressed by URL: a local folder (the default, or a mount every worker shares), or any fsspec URL
(`s3://bucket/prefix` with s3fs installed, `gs://...` with gcsfs, `file:///...`).

The steps always read and write a local folder. For a URL output that folder is a mirror in the weightsmith cache:
a target's artifact is pulled from the storage before a step and pushed after it, so a worker on another machine
(a step handed to the `cuda` or `apple` pool) finds what the previous step made. Object stores have no atomic
rename, so a push first deletes the stored manifest, uploads every other file, removes stored files the artifact no
longer has, and uploads the manifest last: a reader (a resumed run, another worker) never takes a half-uploaded
folder for a complete one. A pull lands in a staging folder that replaces the mirror's only when complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.files import cache_root, staging_dir

MANIFEST = "manifest.json"


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
    with staging_dir(local) as tmp:
        for name in json.loads(stored)["files"]:
            target = tmp / name["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{where}/{name['path']}", str(target))
        (tmp / MANIFEST).write_text(stored, encoding="utf-8")


def push(output: str, model: str, folder: str) -> None:
    """Upload the mirror's `model/folder` to the storage, manifest last; nothing to do when both manifests agree."""
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
    if fs.exists(f"{where}/{MANIFEST}"):
        fs.rm_file(f"{where}/{MANIFEST}")
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != MANIFEST)
    for name in files:
        fs.makedirs(f"{where}/{name}".rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local / name), f"{where}/{name}")
    for stored in fs.find(where):
        if stored.removeprefix(where.rstrip("/") + "/") not in files:
            fs.rm_file(stored)
    fs.put_file(str(local / MANIFEST), f"{where}/{MANIFEST}")


def push_files(output: str, model: str, names: list[str]) -> None:
    """Upload run-level files of the mirror's `model` folder (summary, report)."""
    if not is_url(output):
        return
    fs, where = _remote(output, model)
    fs.makedirs(where, exist_ok=True)
    for name in names:
        fs.put_file(str(mirror(output) / model / name), f"{where}/{name}")
