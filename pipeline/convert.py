"""The steps of a plan as plain functions, and the loop that runs a plan: the same for the CLI and the Prefect flow.

    prepare   resolve the source and describe it, clear what killed runs left (before any step, holding the output
              folder's lock: one writer per output, see pipeline.lock)
    build     write the artifact into its candidate folder (`.<folder>.candidate`), unless a validated artifact made
              from the same inputs is already published (then every later step of the target is skipped)
    validate  run the candidate in its own runtime against the source; judge it against the budget
    engine    (formats that have one) build and run the engine from the validated candidate
    serve     (formats that have a server script) start it from the candidate's folder and check its chat replies
              against our runtime's (pipeline.serve)
    publish   move a validated candidate into place in one rename; anything else leaves the published artifact
              untouched and records why there is no new one

Each step takes the target's latest manifest and returns the next one; none raises for a target that fails or
cannot run, so one target's trouble never stops the others. `execute` runs the plan's steps in order, handing each
the published artifacts of the targets it is made from; `runner` is how a step is run (directly here, as a Prefect
task or a flow run on another hardware pool in `flows/convert.py`).
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import console, hardware, storage
from pipeline.artifacts import (
    SUMMARY,
    candidate_dir,
    format_table,
    list_files,
    read_manifest,
    remove_stale,
    summary_rows,
    verify_files,
    work_dir,
    write_manifest,
)
from pipeline.checkpoint import Checkpoint
from pipeline.corpus import calibration_samples, load_text
from pipeline.files import readable_by_all, replace_dir, staging_dir, write_json
from pipeline.formats.base import BuildContext, Format, engine_not_run
from pipeline.handoff import chat_info, write_handoff
from pipeline.lanes import Lane, lanes, run_lanes
from pipeline.lock import output_lock
from pipeline.plan import Plan, PlannedStep, make_plan
from pipeline.recipe import Recipe
from pipeline.reference import cache_folder, eval_chunks, reference
from pipeline.reference import mode as reference_mode
from pipeline.report import write_report
from pipeline.resources import GB, PROCESS, Needs, machine_free, model_size, reference_memory, shortfalls
from pipeline.source import load_tokenizer, resolve_source
from pipeline.types import (
    MANIFEST,
    FormatError,
    InputError,
    Manifest,
    NotEnoughResources,
    SourceError,
    SourceInfo,
    Status,
    Step,
    Target,
    folder_of,
    now,
    one_line,
)
from pipeline.validate import QUALITY_FIGURES, judge

log = logging.getLogger("weightsmith")
Runner = Callable[[PlannedStep, "Manifest | None", dict[str, Manifest]], Manifest]


def prepare(recipe: Recipe, plan: Plan | None = None) -> SourceInfo:
    """Resolve and describe the source, check what the plan will read (tokenizer, held-out and calibration texts),
    and clear what killed runs left: all before any build. Call it holding the output folder's lock."""
    log.info("resolving source %s", recipe.source.id)
    source = resolve_source(recipe.source, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code)
    log.info("source: %s (%s, %.1fM parameters, %s, %d shard(s)) at %s", source.architecture, source.model_type,
             source.n_params / 1e6, source.dtype, len(source.shards), source.path)  # fmt: skip
    plan = plan or make_plan(recipe)
    preflight(recipe, plan, source)
    if recipe.check_resources:
        check_resources(recipe, plan, source)
    for stale in remove_stale(recipe.output_dir()) if recipe.output_dir().exists() else []:
        log.warning("removed %s left by an interrupted run", stale.name)
    return source


def preflight(recipe: Recipe, plan: Plan, source: SourceInfo) -> None:
    """InputError for a tokenizer, held-out or calibration text the plan cannot use, or a streamed reference of an
    architecture the layer walker cannot run, found before any build."""
    if not {"tokenizer.json", "tokenizer.model"} & set(source.tokenizer_files):
        raise SourceError(f"source {source.spec!r} has no tokenizer (tokenizer.json or tokenizer.model): add the "
                          f"model's tokenizer files to {source.path}")  # fmt: skip
    tokenizer = load_tokenizer(source.path, source.trust_remote_code)
    validation, calibration = recipe.validation, recipe.calibration
    if validation.reference == "streamed":
        reference_mode(source, validation, recipe.dtype)  # InputError for a source the layer walker cannot run
    try:
        eval_chunks(tokenizer, load_text(validation.held_out, "held_out"), validation.eval_tokens, validation.context)
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"validation.held_out {validation.held_out!r}: {exc}: give a longer text, or lower "
                         f"validation.eval_tokens or context") from None  # fmt: skip
    if any(fmt.calibrates for fmt in plan.formats.values()):
        text = load_text(calibration.text, "calibration")
        try:
            calibration_samples(tokenizer, text, calibration.samples, calibration.seq_len, calibration.seed)
        except ValueError as exc:
            raise InputError(f"calibration.text {calibration.text!r}: {exc}") from None


def check_resources(recipe: Recipe, plan: Plan, source: SourceInfo) -> None:
    """NotEnoughResources, before anything runs, when the plan's largest step or its artifacts will not fit here
    (estimates: pipeline.resources and each format's `needs`)."""
    needs, reference_bytes = estimates(recipe, plan, source)
    memory, disk = machine_free(recipe.output_dir())
    if problems := shortfalls(needs, reference_bytes, memory, disk):
        raise NotEnoughResources(f"{recipe.name}: {'; '.join(problems)}: run it on a larger machine, convert "
                                 f"fewer targets per run, or set check_resources: false if the estimate is "
                                 f"wrong")  # fmt: skip
    peak = max([reference_bytes, *(b for n in needs.values() for b in n.memory.values())]) + PROCESS
    log.info("resources: the largest step needs about %.1f GB of the %.1f GB available", peak / 1e9, memory / 1e9)


def estimates(recipe: Recipe, plan: Plan, source: SourceInfo) -> tuple[dict[str, Needs], int]:
    """Each target's estimated needs, and the memory of the reference pass (0 when its results are cached)."""
    size = model_size(Checkpoint(source.path), source.config())
    needs = {key: fmt.needs(size, recipe.validation, recipe.calibration) for key, fmt in plan.formats.items()}
    held_out = load_text(recipe.validation.held_out, "held_out")
    if (cache_folder(source, recipe.validation, recipe.dtype, held_out) / "reference.json").is_file():
        return needs, 0
    streamed = reference_mode(source, recipe.validation, recipe.dtype, machine_free(recipe.output_dir())[0],
                              size) == "streamed"  # fmt: skip
    return needs, reference_memory(size, recipe.validation, recipe.dtype, streamed)


def execute(plan: Plan, runner: Runner, source: SourceInfo | None = None) -> list[Manifest]:
    """Run every step of the plan that has something to do, each target's steps in order and each target after the
    ones it is made from, up to `concurrency.targets` targets at once within the memory budget (`pipeline.lanes`;
    `source` gives the memory estimates); return each target's final manifest."""

    def run_lane(lane: Lane, finished: dict[str, Manifest]) -> Manifest:
        current = None
        for step in lane.steps:
            if should_run(step, current):
                current = runner(step, current, {k: finished[k] for k in step.inputs})
        return current

    concurrency = plan.recipe.concurrency
    if concurrency.targets <= 1 or source is None:
        results = run_lanes(lanes(plan), run_lane)
    else:
        needs, reference_bytes = estimates(plan.recipe, plan, source)
        memory = {key: max([*n.memory.values(), reference_bytes if Step.VALIDATE in n.memory else 0])
                  for key, n in needs.items()}  # fmt: skip
        budget = int(concurrency.memory_gb * GB) if concurrency.memory_gb else machine_free(
            plan.recipe.output_dir())[0] - PROCESS  # fmt: skip
        log.info("up to %d targets at once within %.1f GB", concurrency.targets, budget / GB)
        results = run_lanes(lanes(plan, memory), run_lane, concurrency.targets, budget)
    return [results[t.key] for t in plan.recipe.targets]


def should_run(step: PlannedStep, current: Manifest | None) -> bool:
    """Whether `step` has anything to do after the target's steps so far left `current`."""
    if step.step == Step.BUILD:
        return True
    if current is None or current.resumed:
        return False
    if step.step == Step.VALIDATE:
        return current.status == Status.BUILT
    if step.step in (Step.ENGINE, Step.SERVE):
        return current.status == Status.OK
    return True  # publish: a new artifact, or the record of why there is none


def run_step(recipe: Recipe, source: SourceInfo, plan: Plan, step: PlannedStep, current: Manifest | None,
             inputs: dict[str, Manifest], force: bool = False) -> Manifest:  # fmt: skip
    """One step of the plan, on the artifact pulled from the recipe's output storage (pushed back after)."""
    fmt, target = plan.formats[step.key], step.target
    run = {Step.BUILD: functools.partial(build, force=force, inputs_hash=plan.inputs(source, step.key)),
           Step.VALIDATE: validate, Step.ENGINE: engine, Step.SERVE: serve,
           Step.PUBLISH: publish}[step.step]  # fmt: skip
    folders = [target.folder, candidate_dir(Path(target.folder)).name]
    for folder in [*map(folder_of, inputs), *folders]:
        storage.pull(recipe.output, recipe.name, folder)
    result = run(recipe, source, fmt, current, inputs)
    for folder in folders:
        storage.push(recipe.output, recipe.name, folder)
    return result


def run_recipe(recipe: Recipe, force: bool = False) -> dict[str, Any]:
    """Every step of a recipe in order, without Prefect. Returns the run summary."""
    started, plan = now(), make_plan(recipe)
    with output_lock(recipe.output_dir()):
        source = prepare(recipe, plan)
        manifests = execute(plan, lambda step, current, inputs: run_step(recipe, source, plan, step, current, inputs,
                                                                         force), source)  # fmt: skip
        return summarize(recipe, source, manifests, started)


def published(recipe: Recipe, key: str) -> Path:
    return recipe.output_dir() / folder_of(key)


def cannot_run(fmt: Format, step: Step) -> str | None:
    """Why `step` cannot run on this machine (missing package or hardware), or None."""
    if why := fmt.missing_dependency(step):
        return why
    wanted = fmt.runs_on(step)
    if not set(wanted) & hardware.available():
        kinds = ", ".join(sorted(hardware.available()))
        return f"no_{wanted[0]}_device: {step} needs {' or '.join(wanted)}; this machine offers {kinds}"
    return None


def base_manifest(recipe: Recipe, source: SourceInfo, target: Target, inputs_hash: str) -> Manifest:
    budget = recipe.budget(target)
    return Manifest(model=recipe.name, target=target.key, format=target.format, quant=target.quant,
                    status=Status.BUILT, source=source.describe(),
                    recipe_entry=target.model_dump(mode="json", exclude_none=True),
                    budget=budget.model_dump(mode="json") if budget else None, versions=hardware.versions(),
                    built_on=hardware.describe(), inputs=inputs_hash)  # fmt: skip


def up_to_date(final: Path, inputs_hash: str) -> Manifest | None:
    """The published artifact at `final` if it passed validation, was made from the same inputs and is intact."""
    existing = read_manifest(final) if final.is_dir() else None
    if existing is None or existing.status != Status.OK or existing.inputs != inputs_hash or not existing.files:
        return None
    return None if verify_files(final, existing) else existing


def build(recipe: Recipe, source: SourceInfo, fmt: Format, current: Manifest | None, inputs: dict[str, Manifest], *,
          force: bool, inputs_hash: str) -> Manifest:  # fmt: skip
    """Build the artifact into its candidate folder (`current` is always None: a build starts the target afresh)."""
    target = fmt.target
    final = published(recipe, target.key)
    manifest = base_manifest(recipe, source, target, inputs_hash)
    if not force and (done := up_to_date(final, inputs_hash)):
        log.info("%s: up to date (validated %s), skipped; --force rebuilds it", target.key, done.updated_at)
        return done.model_copy(update={"resumed": True})
    if blocked := {k: m.status for k, m in inputs.items() if m.status != Status.OK}:
        why = ", ".join(f"{k}, which is {s}" for k, s in blocked.items())
        return _outcome(manifest.with_step(Step.BUILD, Status.NOT_RUN, f"build: made from {why}"))
    if why := cannot_run(fmt, Step.BUILD):
        return _outcome(manifest.with_step(Step.BUILD, Status.NOT_RUN, f"build: {why}"))
    try:
        fmt.check(source)
    except FormatError as exc:
        return _outcome(manifest.with_step(Step.BUILD, Status.REFUSED, f"{target.format} refused: {exc}"))
    start = time.perf_counter()
    context = BuildContext(name=recipe.name, calibration=recipe.calibration, progress=console.progress(target.key),
                           inputs={k: published(recipe, k) for k in inputs}, work=work_dir(final))  # fmt: skip
    log.info("%s: building", target.key)
    try:
        with staging_dir(candidate_dir(final)) as tmp:
            info = fmt.build(source, tmp, context)
            readable_by_all(tmp)
            manifest = manifest.with_step(Step.BUILD, Status.BUILT, files=list_files(tmp), build=info,
                                          timings={"build_s": round(time.perf_counter() - start, 2)})  # fmt: skip
            manifest = write_manifest(tmp, manifest)
    except Exception as exc:  # recorded, not raised: the other targets go on
        log.debug("%s", traceback.format_exc())
        return _outcome(manifest.with_step(Step.BUILD, Status.FAILED, f"build: {one_line(exc)}"))
    log.info("%s: built (%.1f MB) in %.1f s", target.key, manifest.size / 1e6, manifest.timings["build_s"])
    return manifest


def validate(recipe: Recipe, source: SourceInfo, fmt: Format, current: Manifest,
             inputs: dict[str, Manifest]) -> Manifest:  # fmt: skip
    """Run the candidate in its own runtime against the source and judge it; a passing one gets its hand-off files."""
    target = fmt.target
    folder = candidate_dir(published(recipe, target.key))
    if changed := verify_files(folder, current):
        return _record(folder, current.with_step(Step.VALIDATE, Status.FAILED,
                                                 f"files changed since the build: {', '.join(changed)}"))  # fmt: skip
    if why := cannot_run(fmt, Step.VALIDATE):
        return _record(folder, current.with_step(Step.VALIDATE, Status.NOT_RUN, f"validate: {why}"))
    start = time.perf_counter()
    log.info("%s: validating", target.key)
    try:
        result = fmt.validate(folder, reference(source, recipe.validation, recipe.dtype), recipe.validation)
    except Exception as exc:
        log.debug("%s", traceback.format_exc())
        return _record(folder, current.with_step(Step.VALIDATE, Status.FAILED, f"validation crashed: {one_line(exc)}"))
    quality = result["quality"]
    failures = result["failures"] + judge(quality, recipe.budget(target), result["smoke"]["tokenizer"])
    updates = {
        "smoke": result["smoke"],
        "quality": {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in quality.items()},
        "validated_on": {**hardware.describe(), "runtime": result["smoke"]["runtime"]["runtime"]},
        "timings": {**current.timings, "validate_s": round(time.perf_counter() - start, 2)},
    }
    log.info("%s: %s", target.key, ", ".join(f"{k} {quality[k]:.5g}" for k in QUALITY_FIGURES if k in quality))
    if failures:
        return _record(folder, current.with_step(Step.VALIDATE, Status.FAILED, "; ".join(failures), **updates))
    return _with_handoff(recipe, fmt, folder, current.with_step(Step.VALIDATE, Status.OK, **updates))


def engine(recipe: Recipe, source: SourceInfo, fmt: Format, current: Manifest,
           inputs: dict[str, Manifest]) -> Manifest:  # fmt: skip
    """The engine step (TensorRT): built and run from the validated candidate, on this machine."""
    target = fmt.target
    folder = candidate_dir(published(recipe, target.key))
    log.info("%s: engine build and smoke test", target.key)
    paths = {k: published(recipe, k) for k, m in inputs.items() if m.status == Status.OK}
    try:
        outcome = fmt.engine(folder, reference(source, recipe.validation, recipe.dtype), recipe.validation, paths)
    except Exception as exc:
        outcome = {"build": {"status": Status.FAILED, "reason": f"{type(exc).__name__}: {exc}"},
                   "smoke": {"status": Status.NOT_RUN, "reason": "engine_build_failed"}}  # fmt: skip
    return record_engine(recipe, fmt, folder, current, outcome)


def record_engine(recipe: Recipe, fmt: Format, folder: Path, current: Manifest, outcome: dict[str, Any]) -> Manifest:
    """An engine step's outcome in the candidate's manifest: ok when built and smoke-tested, failed when either
    failed, not_run (with the reason code) when it could not run."""
    smoke = {**(current.smoke or {}), "engine": outcome}
    failed = [f"engine {k}: {outcome[k]['reason']}" for k in ("build", "smoke")
              if outcome[k]["status"] == Status.FAILED]  # fmt: skip
    if failed:
        status, reason = Status.FAILED, "; ".join(failed)
    elif outcome["build"]["status"] == Status.NOT_RUN:
        status = Status.NOT_RUN
        reason = f"engine build and smoke: {outcome['build']['reason']} ({outcome['build'].get('detail', '')})"
    else:
        status, reason = Status.OK, None
    return _with_handoff(recipe, fmt, folder, current.with_step(Step.ENGINE, status, reason, smoke=smoke))


def serve(recipe: Recipe, source: SourceInfo, fmt: Format, current: Manifest,
          inputs: dict[str, Manifest]) -> Manifest:  # fmt: skip
    """The serve check of a validated candidate: ok, failed (then it is not published), or not_run with the reason
    where the server cannot run here; the target keeps its status unless the check failed."""
    folder = candidate_dir(published(recipe, fmt.target.key))
    if why := cannot_run(fmt, Step.SERVE):
        outcome = {"status": Status.NOT_RUN, "server": fmt.server, "reason": why}
    else:
        log.info("%s: serve check in %s", fmt.target.key, fmt.server)
        log_file = console.log_folder() / f"serve-{fmt.target.folder}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        outcome = fmt.serve(folder, current, recipe.validation, log_file)
    return record_serve(fmt, folder, current, outcome)


def record_serve(fmt: Format, folder: Path, current: Manifest, outcome: dict[str, Any]) -> Manifest:
    """A serve check's outcome in the candidate's manifest: the target fails with it, otherwise keeps its status."""
    failed = outcome["status"] == Status.FAILED
    updates = {"serve": outcome, "steps": {**current.steps, Step.SERVE: outcome["status"]},
               "status": Status.FAILED if failed else current.status,
               "reason": f"serve check: {outcome['reason']}" if failed else current.reason}  # fmt: skip
    if not failed:
        log.info("%s: serve check %s (%s)", fmt.target.key, outcome["status"], outcome.get("reason") or fmt.server)
    return _record(folder, current.model_copy(update=updates))


def not_run_elsewhere(recipe: Recipe, source: SourceInfo, fmt: Format, step: Step, current: Manifest | None,
                      status: Status, code: str, detail: str, inputs_hash: str) -> Manifest:  # fmt: skip
    """Record that `step`, handed to another hardware pool, did not run there (`not_run`) or failed there
    (`failed`), with a reason code (`no_apple_worker`) and its detail."""
    folder = candidate_dir(published(recipe, fmt.target.key))
    if step == Step.ENGINE:
        outcome = engine_not_run(code, detail)
        if status == Status.FAILED:
            outcome["build"] = {"status": Status.FAILED, "reason": f"{code}: {detail}"}
        return record_engine(recipe, fmt, folder, current, outcome)
    if step == Step.SERVE and current is not None:
        outcome = {"status": status, "server": fmt.server, "reason": f"{code}: {detail}"}
        return record_serve(fmt, folder, current, outcome)
    if step == Step.BUILD or current is None:
        manifest = base_manifest(recipe, source, fmt.target, inputs_hash)
        return _outcome(manifest.with_step(Step.BUILD, status, f"build: {code}: {detail}"))
    return _record(folder, current.with_step(step, status, f"{step}: {code}: {detail}"))


def publish(recipe: Recipe, source: SourceInfo, fmt: Format, current: Manifest,
            inputs: dict[str, Manifest]) -> Manifest:  # fmt: skip
    """Move a validated candidate into place; for any other outcome keep the published artifact as it is and record
    why there is no new one (beside it in the summary, or as a manifest-only folder when there is none)."""
    final = published(recipe, fmt.target.key)
    candidate = candidate_dir(final)
    passed = current.steps.get(Step.VALIDATE) == Status.OK and Status.FAILED not in current.steps.values()
    if passed and candidate.is_dir():
        replace_dir(candidate, final)
        log.info("%s: published %s", fmt.target.key, final)
        return current
    shutil.rmtree(candidate, ignore_errors=True)
    existing = read_manifest(final) if final.is_dir() else None
    if existing is not None and existing.files:
        log.warning("%s: no new artifact (%s: %s); the published one from %s is kept as it was", fmt.target.key,
                    current.status, current.reason, existing.updated_at)  # fmt: skip
        return current
    record = current.model_copy(update={"files": [], "handoff": []})  # the reason, with no artifact beside it
    with staging_dir(final) as tmp:
        return write_manifest(tmp, record)


def _outcome(manifest: Manifest) -> Manifest:
    """A target's outcome before any candidate exists (not run, refused, build failed): logged; recorded at publish."""
    log.warning("%s: %s: %s", manifest.target, manifest.status, manifest.reason)
    return manifest


def _record(folder: Path, manifest: Manifest) -> Manifest:
    if manifest.status != Status.OK:
        log.warning("%s: %s: %s", manifest.target, manifest.status, manifest.reason)
    return write_manifest(folder, manifest)


def _with_handoff(recipe: Recipe, fmt: Format, folder: Path, manifest: Manifest) -> Manifest:
    """Write the serving hand-off files and model card of a validated candidate, then its manifest listing them."""
    manifest = manifest.model_copy(update={"serving": fmt.serving(folder)})
    for stack, verdict in manifest.serving.items():
        if not verdict.accepts:
            log.warning("%s: not for %s: %s", manifest.target, stack, verdict.why)
    try:
        files = fmt.handoff_files(folder, manifest, chat_info(manifest, published(recipe, fmt.target.key)))
        written = write_handoff(folder, manifest, files, fmt.library)
    except Exception as exc:  # the artifact is fine; the serving files are a convenience: say so and go on
        log.warning("%s: no serving hand-off files: %s", manifest.target, exc)
        written = []
    return _record(folder, manifest.model_copy(update={"files": list_files(folder), "handoff": written}))


def summarize(recipe: Recipe, source: SourceInfo, manifests: list[Manifest], started: str) -> dict[str, Any]:
    rows = summary_rows(manifests)
    for row in rows:
        row["manifest"] = str(published(recipe, row["target"]) / MANIFEST)
    summary = {
        "model": recipe.name,
        "source": {"spec": source.spec, "revision": source.revision, "fingerprint": source.fingerprint},
        "started_at": started,
        "finished_at": now(),
        "ok": not any(m.status == Status.FAILED for m in manifests),
        "targets": rows,
    }
    coverage = {m.target: m.build["expert_coverage"] for m in manifests if (m.build or {}).get("expert_coverage")}
    if coverage:  # mixtures of experts: how many calibration tokens each layer's experts saw (pipeline.report)
        summary["expert_coverage"] = coverage
    recipe.output_dir().mkdir(parents=True, exist_ok=True)
    report = write_report(recipe.output_dir(), summary)
    summary["report"] = str(report["html"])
    write_json(recipe.output_dir() / SUMMARY, summary)
    storage.push_files(recipe.output, recipe.name, [SUMMARY, *(p.name for p in report.values())])
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    return format_table(summary["targets"])
