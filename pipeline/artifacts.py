"""Artifact folders, their manifests, and the run summary.

One folder per (model, format, quant): `<output>/<model>/<format>-<quant>/`. A build writes into a hidden staging
sibling (`.gguf-q8_0.partial-<id>`) and renames it into place only when every file is written and hashed, so a
crash or a kill never leaves a folder that looks complete; an older artifact of the same name stays in place until
the new one is ready. `manifest.json` is always replaced atomically (temporary file + `os.replace`).

Manifest `status`: `built` (files complete, not yet validated), `ok` (validated, within budget), `failed` (with
`reason`; the numbers that failed are kept) or `not_run` (with `reason`: a step that cannot run here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from pipeline.source import file_sha256

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
Status = Literal["built", "ok", "failed", "not_run"]


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    schema_version: int = 1
    model: str
    target: str
    format: str
    quant: str
    status: Status
    reason: str | None = None
    files: list[FileEntry] = Field(default_factory=list)
    source: dict[str, Any] = Field(default_factory=dict)
    recipe_entry: dict[str, Any] = Field(default_factory=dict)
    budget: dict[str, Any] | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    built_on: dict[str, Any] | None = None
    validated_on: dict[str, Any] | None = None
    build: dict[str, Any] = Field(default_factory=dict)
    smoke: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    handoff: list[str] = Field(default_factory=list)  # serving files and model card written beside the artifact
    inputs: str | None = None  # hash of what the artifact was made from (see pipeline.convert.target_inputs)
    resumed: bool = Field(default=False, exclude=True)  # this run found it complete and up to date (not stored)
    timings: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: now())
    updated_at: str = Field(default_factory=lambda: now())

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of `final`; on success it replaces `final`, on any error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(new: Path, final: Path) -> None:
    """Move `new` to `final`; an existing `final` is set aside first and deleted only after the move."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(model_dir: Path) -> list[Path]:
    """Delete staging folders left by killed runs (`.X.partial-*`, `.X.old-*`); return what was removed."""
    stale = [p for p in model_dir.glob(".*") if p.is_dir() and (".partial-" in p.name or ".old-" in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def list_files(folder: Path) -> list[FileEntry]:
    return [
        FileEntry(path=str(f.relative_to(folder)), size=f.stat().st_size, sha256=file_sha256(f))
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    ]


def write_json(path: Path, data: Any) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    manifest = manifest.model_copy(update={"updated_at": now()})
    write_json(folder / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    return Manifest.model_validate_json(path.read_text(encoding="utf-8"))


def verify_files(folder: Path, manifest: Manifest) -> list[str]:
    """Files that are missing or differ from what the manifest recorded (empty when the folder is intact)."""
    present = {f.path: f for f in list_files(folder)}
    return [f.path for f in manifest.files if present.get(f.path) != f] + [
        p for p in present if p not in {f.path for f in manifest.files}
    ]


def summary_rows(manifests: list[Manifest]) -> list[dict[str, Any]]:
    rows = []
    for m in manifests:
        quality, validated = m.quality or {}, m.validated_on or {}
        params = m.source.get("n_params")
        generation = (m.smoke or {}).get("generation") or {}
        rows.append(
            {
                "target": m.target,
                "status": m.status,
                "size_mb": round(m.size / 1e6, 1),
                "bits_per_weight": round(m.size * 8 / params, 3) if params and m.files else None,
                "ppl": quality.get("ppl"),
                "ppl_source": quality.get("ppl_source"),
                "ppl_ratio": quality.get("ppl_ratio"),
                "top1": quality.get("top1_agreement"),
                "kl_mean": quality.get("kl_mean"),
                "kl_p99": quality.get("kl_p99"),
                "tokens_per_s": generation.get("tokens_per_s"),
                "build_s": m.timings.get("build_s"),
                "validate_s": m.timings.get("validate_s"),
                "validated_on": f"{validated['runtime']} on {validated.get('gpu') or validated.get('cpu') or '?'}"
                if validated.get("runtime")
                else None,
                "reason": m.reason,
                "resumed": m.resumed,
            }
        )
    return rows


TABLE_COLUMNS = {  # column -> format of its numbers
    "target": "{}",
    "status": "{}",
    "size_mb": "{:.1f}",
    "ppl": "{:.3f}",
    "ppl_ratio": "{:.4f}",
    "top1": "{:.4f}",
    "kl_mean": "{:.5f}",
    "build_s": "{:.1f}",
    "validate_s": "{:.1f}",
    "reason": "{}",
}


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[_cell(row.get(c), fmt) for c, fmt in TABLE_COLUMNS.items()] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    text = fmt.format(value)
    return text if len(text) <= 80 else text[:77] + "..."
