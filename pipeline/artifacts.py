"""Artifact folders, their manifests, and the run summary.

One folder per target: `<output>/<model>/<format>-<quant>/`, holding the artifact's files and `manifest.json` (see
`pipeline.types.Manifest`). A target is built into its candidate folder (`.<folder>.candidate`), validated there, and
only then published: renamed into place, fsynced, replacing an older artifact of the same name in one rename
(`pipeline.files.replace_dir`). A crash, a kill or a failing successor never leaves a folder that looks complete,
and never touches a published artifact. `write_manifest` is the one place manifests are written.

Manifest `status`: `built` (files complete, not yet validated), `ok` (validated, within budget), `failed` (with
`reason`; the numbers that failed are kept), `not_run` (with `reason`: a step that cannot run here) or `refused`
(the format cannot take this source).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.files import file_sha256, write_json
from pipeline.types import MANIFEST, FileEntry, Manifest, now

SUMMARY = "summary.json"


def candidate_dir(final: Path) -> Path:
    """Where a target's artifact is built and validated before it is published at `final`."""
    return final.parent / f".{final.name}.candidate"


def work_dir(final: Path) -> Path:
    """Where a build of the target published at `final` keeps finished work across runs (GPTQ's finished layers), so
    a killed run resumes; not a staging folder: `remove_stale` leaves it."""
    return final.parent / f".{final.name}.layers"


def remove_stale(model_dir: Path) -> list[Path]:
    """Delete staging folders left by killed runs (`.X.partial-*`, `.X.old-*`); return what was removed."""
    stale = [p for p in model_dir.glob(".*") if p.is_dir() and (".partial-" in p.name or ".old-" in p.name
                                                                  or p.name.endswith(".candidate"))]  # fmt: skip
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def list_files(folder: Path) -> list[FileEntry]:
    return [
        FileEntry(path=str(f.relative_to(folder)), size=f.stat().st_size, sha256=file_sha256(f))
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    ]


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
                "status": m.status.value,
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
                "served": served(m.serve),
                "reason": m.reason,
                "resumed": m.resumed,
            }
        )
    return rows


def served(outcome: dict[str, Any] | None) -> str | None:
    """The serve check in a few words: the server, its outcome, the slowest time to first token."""
    if not outcome:
        return None
    ttft = [c["ttft_s"] for c in outcome.get("cases", []) if "ttft_s" in c]
    return f"{outcome['status']} in {outcome['server']}" + (f", first token {max(ttft):.2f} s" if ttft else "")


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
    "served": "{}",
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
