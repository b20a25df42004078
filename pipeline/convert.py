"""The conversion steps as plain functions: resolve the source, build a target, validate it, summarise the run.

The Prefect flow (`flows/convert.py`) runs each step as a task; `run_recipe` runs them in sequence without Prefect.
Every step records its outcome in the target's manifest; none of them raises for a target that fails or cannot
run here, so one target's trouble never stops the others.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from pipeline import __version__, hardware, storage
from pipeline.artifacts import (
    MANIFEST,
    SUMMARY,
    Manifest,
    format_table,
    list_files,
    now,
    read_manifest,
    remove_stale,
    staging_dir,
    summary_rows,
    verify_files,
    write_json,
    write_manifest,
)
from pipeline.formats import FORMATS, engine_not_run
from pipeline.handoff import write_handoff
from pipeline.recipe import Recipe, Target, folder_of
from pipeline.report import write_report
from pipeline.source import SourceInfo, resolve_source
from pipeline.validate import judge, reference

log = logging.getLogger("weightsmith")


def synced(step):
    """Run `step(recipe, source, target, ...)` on the target's artifact pulled from the recipe's output storage, with
    the artifacts it is made from, and push what it leaves (a no-op for a plain folder output; see pipeline.storage)."""

    @functools.wraps(step)
    def run(recipe: Recipe, source: SourceInfo, target: Target, *args, **kwargs) -> Manifest:
        for key in depends_on(target):  # e.g. the ONNX graph a plain TensorRT engine is built from, on another worker
            storage.pull(recipe.output, recipe.name, folder_of(key))
        storage.pull(recipe.output, recipe.name, target.folder)
        result = step(recipe, source, target, *args, **kwargs)
        storage.push(recipe.output, recipe.name, target.folder)
        return result

    return run


def prepare(recipe: Recipe) -> SourceInfo:
    log.info("resolving source %s", recipe.source.id)
    source = resolve_source(recipe.source, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code)
    log.info(
        "source: %s (%s, %.1fM parameters, %s, %d shard(s)) at %s",
        source.architecture,
        source.model_type,
        source.n_params / 1e6,
        source.dtype,
        len(source.shards),
        source.path,
    )
    for stale in remove_stale(recipe.output_dir()) if recipe.output_dir().exists() else []:
        log.warning("removed %s left by an interrupted run", stale.name)
    return source


def cannot_run(fmt, step: str, target: Target) -> str | None:
    """Why `step` of a target cannot run on this machine (missing package or hardware), or None."""
    if why := fmt.missing_dependency(step, target):
        return why
    wanted = fmt.HARDWARE[step]
    if not set(wanted) & hardware.available():
        kinds = ", ".join(sorted(hardware.available()))
        return f"no_{wanted[0]}_device: {step} needs {' or '.join(wanted)}; this machine offers {kinds}"
    return None


def _base_manifest(recipe: Recipe, source: SourceInfo, target: Target) -> Manifest:
    budget = recipe.budget(target)
    return Manifest(
        model=recipe.name,
        target=target.key,
        format=target.format,
        quant=target.quant,
        status="built",
        source=source.describe(),
        recipe_entry=target.model_dump(mode="json", exclude_none=True),
        budget=budget.model_dump(mode="json") if budget else None,
        versions=hardware.versions(),
        built_on=hardware.describe(),
        inputs=target_inputs(recipe, source, target),
    )


def target_inputs(recipe: Recipe, source: SourceInfo, target: Target) -> str:
    """A hash of everything a target's artifact and its verdict depend on: the source files, the recipe entry, its
    budget, the calibration and validation settings, the code, and the inputs of targets it is made from. A rerun
    skips a target whose hash is unchanged."""
    inputs = {
        "source": source.fingerprint,
        "target": target.model_dump(mode="json"),
        "budget": (b := recipe.budget(target)) and b.model_dump(mode="json"),
        "calibration": recipe.calibration.model_dump(mode="json"),
        "validation": recipe.validation.model_dump(mode="json", exclude={"budgets"}),
        "dtype": recipe.dtype,
        "code": code_version(),
        "depends": [target_inputs(recipe, source, t) for t in recipe.targets if t.key in depends_on(target)],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def depends_on(target: Target) -> list[str]:
    """The recipe targets whose artifacts this one is made from (a format's optional `depends_on`)."""
    return getattr(FORMATS[target.format], "depends_on", lambda _: [])(target)


@functools.cache
def code_version() -> str:
    """weightsmith's version and a hash of its own source files (a changed converter invalidates its artifacts)."""
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def up_to_date(final: Path, inputs: str | None) -> Manifest | None:
    """The artifact at `final` if it passed validation, was made from the same inputs and is intact, else None."""
    existing = read_manifest(final) if final.is_dir() else None
    if existing is None or existing.status != "ok" or existing.inputs != inputs or not existing.files:
        return None
    return None if verify_files(final, existing) else existing


@synced
def build_target(recipe: Recipe, source: SourceInfo, target: Target, force: bool = False) -> Manifest:
    """Build one target into its artifact folder, unless an up-to-date validated one is there (`force` rebuilds)."""
    fmt = FORMATS[target.format]
    final = recipe.output_dir() / target.folder
    manifest = _base_manifest(recipe, source, target)
    if not force and (done := up_to_date(final, manifest.inputs)):
        log.info("%s: up to date (validated %s), skipped; --force rebuilds it", target.key, done.updated_at)
        return done.model_copy(update={"resumed": True})
    if why := cannot_run(fmt, "build", target):
        log.warning("%s: build not run: %s", target.key, why)
        return _record_without_artifact(final, manifest.model_copy(update={"status": "not_run", "reason": why}))
    start = time.perf_counter()
    try:
        fmt.check(source, target)
        log.info("%s: building", target.key)
        with staging_dir(final) as tmp:
            info = fmt.build(source, target, tmp, name=recipe.name, progress=_progress(target.key),
                             calibration=recipe.calibration)  # fmt: skip
            manifest = manifest.model_copy(
                update={
                    "files": list_files(tmp),
                    "build": info,
                    "timings": {"build_s": round(time.perf_counter() - start, 2)},
                }
            )
            write_manifest(tmp, manifest)
    except Exception as exc:  # recorded, not raised: the other targets go on
        log.error("%s: build failed: %s", target.key, exc)
        log.debug("%s", traceback.format_exc())
        return _record_without_artifact(
            final, manifest.model_copy(update={"status": "failed", "reason": f"build: {exc}"})
        )
    log.info("%s: built %s (%.1f MB) in %.1f s", target.key, final, manifest.size / 1e6, manifest.timings["build_s"])
    return read_manifest(final)


def _record_without_artifact(final: Path, manifest: Manifest) -> Manifest:
    """Write a manifest-only folder saying why there is no artifact, unless a built artifact is already in place:
    that one is kept, and the outcome only goes to the run summary."""
    existing = read_manifest(final) if final.is_dir() else None
    if existing is not None and existing.files:
        return manifest
    with staging_dir(final) as tmp:
        write_manifest(tmp, manifest)
    return manifest


def _progress(key: str):
    last = [0.0]

    def report(done: int, total: int, what: str) -> None:
        if done == total or time.monotonic() - last[0] > 5:
            last[0] = time.monotonic()
            log.info("%s: %d/%d tensors (%s)", key, done, total, what)

    return report


@synced
def validate_target(recipe: Recipe, source: SourceInfo, target: Target, built: Manifest) -> Manifest:
    """Smoke-test the artifact `build_target` reported as built; any other outcome passes through unchanged."""
    if built.status != "built":
        return built
    final = recipe.output_dir() / target.folder
    manifest = read_manifest(final)
    fmt = FORMATS[target.format]
    changed = verify_files(final, manifest)
    if changed:
        return _finish(final, manifest, "failed", f"files changed since the build: {', '.join(changed)}", {})
    if why := cannot_run(fmt, "smoke", target):
        log.warning("%s: smoke test not run: %s", target.key, why)
        return _finish(final, manifest, "not_run", f"smoke: {why}", {})
    start = time.perf_counter()
    try:
        log.info("%s: smoke test", target.key)
        result = fmt.smoke(final, reference(source, recipe.validation, recipe.dtype), recipe.validation)
    except Exception as exc:
        log.error("%s: smoke test crashed: %s", target.key, exc)
        return _finish(final, manifest, "failed", f"smoke test crashed: {exc}", {})
    failures = result["failures"] + judge(result["quality"], recipe.budget(target), result["smoke"]["tokenizer"])
    updates = {
        "smoke": result["smoke"],
        "quality": result["quality"],
        "validated_on": {**hardware.describe(), "runtime": result["smoke"]["runtime"]["runtime"]},
        "timings": {**manifest.timings, "validate_s": round(time.perf_counter() - start, 2)},
    }
    quality = result["quality"]
    log.info(
        "%s: ppl %.3f (source %.3f, ratio %.4f), top-1 %.3f, KL %.5f",
        target.key,
        quality["ppl"],
        quality["ppl_source"],
        quality["ppl_ratio"],
        quality["top1_agreement"],
        quality["kl_mean"],
    )
    if failures:
        return _finish(final, manifest, "failed", "; ".join(failures), updates)
    return _finish_passed(final, manifest, "ok", None, updates)


def _finish_passed(final: Path, manifest: Manifest, status: str, reason: str | None, updates: dict) -> Manifest:
    """Record a validated artifact's outcome, with its serving hand-off files and model card."""
    passed = manifest.model_copy(update={**updates, "status": status, "reason": reason})
    try:
        handoff = write_handoff(final, passed)
    except Exception as exc:  # the artifact is fine; the serving files are a convenience: say so and go on
        log.warning("%s: no serving hand-off files: %s", manifest.target, exc)
        handoff = []
    updates = {**updates, "files": list_files(final), "handoff": handoff}  # hand-off files, any engine built
    return _finish(final, manifest, status, reason, updates)


def has_engine(target: Target) -> bool:
    return hasattr(FORMATS[target.format], "engine")


@synced
def engine_target(recipe: Recipe, source: SourceInfo, target: Target, validated: Manifest) -> Manifest:
    """The engine step of formats that have one (TensorRT-LLM), once the artifact itself passed, on this machine."""
    if not has_engine(target) or validated.status != "ok" or validated.resumed:
        return validated
    final = recipe.output_dir() / target.folder
    log.info("%s: engine build and smoke test", target.key)
    try:
        engine = FORMATS[target.format].engine(final, reference(source, recipe.validation, recipe.dtype),
                                               recipe.validation)  # fmt: skip
    except Exception as exc:
        engine = {"build": {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"},
                  "smoke": {"status": "not_run", "reason": "engine_build_failed"}}  # fmt: skip
    return record_engine(final, read_manifest(final), engine)


def record_engine(final: Path, manifest: Manifest, engine: dict[str, Any]) -> Manifest:
    """Write an engine step's outcome into the artifact's manifest: ok when built and smoke-tested, failed when
    either failed, not_run (with the reason code) when it could not run."""
    steps = {"prepare": "ok", "build": engine["build"]["status"], "smoke": engine["smoke"]["status"]}
    smoke = {**(manifest.smoke or {}), "engine": engine, "steps": steps}
    failed = [f"engine {k}: {engine[k]['reason']}" for k in ("build", "smoke") if engine[k]["status"] == "failed"]
    if failed:
        status, reason = "failed", "; ".join(failed)
    elif steps["build"] == "not_run":
        status = "not_run"
        reason = f"engine build and smoke: {engine['build']['reason']} ({engine['build'].get('detail', '')})"
    else:
        status, reason = "ok", None
    return _finish_passed(final, manifest, status, reason, {"smoke": smoke})  # the model card shows the outcome


@synced
def record_elsewhere(recipe: Recipe, source: SourceInfo, target: Target, step: str, current: Manifest | None,
                     status: str, code: str, detail: str) -> Manifest:  # fmt: skip
    """Record that `step` ("build", "smoke" or "engine") of `target`, handed to another hardware pool, did not run
    there (`not_run`) or failed there (`failed`), with a reason code (`no_apple_worker`) and its detail."""
    final = recipe.output_dir() / target.folder
    if step == "engine":
        outcome = engine_not_run(code, detail)
        if status == "failed":
            outcome["build"] = {"status": "failed", "reason": f"{code}: {detail}"}
        return record_engine(final, current, outcome)
    if step == "build":
        failed = _base_manifest(recipe, source, target).model_copy(
            update={"status": status, "reason": f"build: {code}: {detail}"}
        )
        return _record_without_artifact(final, failed)
    return _finish(final, current, status, f"smoke: {code}: {detail}", {})


def _finish(folder: Path, manifest: Manifest, status: str, reason: str | None, updates: dict[str, Any]) -> Manifest:
    if status != "ok":
        log.warning("%s: %s: %s", manifest.target, status, reason)
    return write_manifest(folder, manifest.model_copy(update={**updates, "status": status, "reason": reason}))


def summarize(recipe: Recipe, source: SourceInfo, manifests: list[Manifest], started: str) -> dict[str, Any]:
    rows = summary_rows(manifests)
    for row in rows:
        row["manifest"] = str(recipe.output_dir() / recipe.target(row["target"]).folder / MANIFEST)
    summary = {
        "model": recipe.name,
        "source": {"spec": source.spec, "revision": source.revision, "fingerprint": source.fingerprint},
        "started_at": started,
        "finished_at": now(),
        "ok": not any(m.status == "failed" for m in manifests),
        "targets": rows,
    }
    recipe.output_dir().mkdir(parents=True, exist_ok=True)
    report = write_report(recipe.output_dir(), summary)
    summary["report"] = str(report["html"])
    write_json(recipe.output_dir() / SUMMARY, summary)
    storage.push_files(recipe.output, recipe.name, [SUMMARY, *(p.name for p in report.values())])
    return summary


def run_recipe(recipe: Recipe, force: bool = False) -> dict[str, Any]:
    """Every step of a recipe in sequence, without Prefect. Returns the run summary."""
    started = now()
    source = prepare(recipe)
    manifests = []
    for target in recipe.targets:
        validated = validate_target(recipe, source, target, build_target(recipe, source, target, force))
        manifests.append(engine_target(recipe, source, target, validated))
    return summarize(recipe, source, manifests, started)


def summary_table(summary: dict[str, Any]) -> str:
    return format_table(summary["targets"])
