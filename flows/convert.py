"""The `convert` Prefect flow: one recipe in, every artifact built, validated and published.

The plan and its steps are the library's (`pipeline.plan`, `pipeline.convert`): one task resolves the source
(retried on transient network errors only), then every step of the plan runs as a task (`build gguf/q8_0`,
`validate gguf/q8_0`, `publish gguf/q8_0`, ...), through `pipeline.convert.execute`, exactly as the CLI runs it
without Prefect. This module only adds Prefect: task names, retries, hardware routing, a table artifact with the
results, and a failed flow run when any target fails. It runs without a Prefect server (ephemeral mode) as well as
under a deployment. Under a deployment, a step whose preferred hardware this machine lacks becomes a flow run of the
`step/<pool>` deployment on that hardware's work pool (see `hardware.route` and `flows/step.py`).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run
from prefect.states import Failed, State

from pipeline import convert as steps
from pipeline import hardware, storage
from pipeline.artifacts import candidate_dir, read_manifest
from pipeline.lock import output_lock
from pipeline.plan import Plan, PlannedStep, make_plan
from pipeline.recipe import Recipe, load_recipe
from pipeline.types import (
    ExitCode,
    InputError,
    Manifest,
    OutputBusy,
    SourceError,
    SourceInfo,
    Status,
    Step,
    exit_code,
    now,
    one_line,
)

# Prefect gives the `weightsmith` logger its handlers (PREFECT_LOGGING_EXTRA_LOGGERS) but not a level, so the root's
# WARNING would keep the library's progress lines out of the flow run's logs
if logging.getLogger("weightsmith").level == logging.NOTSET:
    logging.getLogger("weightsmith").setLevel(logging.INFO)


def _transient(task, task_run, state) -> bool:
    """Retry only what may pass by itself: network and file-system hiccups, not a bad source."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) and not isinstance(exc, SourceError)


@task(name="resolve-source", retries=2, retry_delay_seconds=10, retry_condition_fn=_transient, cache_policy=NO_CACHE)
def resolve_source(recipe: Recipe, plan: Plan) -> SourceInfo | str:
    """The source, resolved and checked (see `pipeline.convert.prepare`); a problem with the user's input comes back
    as its message, since a task that raises logs a traceback where one line says it all."""
    try:
        return steps.prepare(recipe, plan)
    except InputError as exc:
        return str(exc)


@task(name="step", task_run_name="{step}", cache_policy=NO_CACHE)
def step_task(recipe: Recipe, source: SourceInfo, plan: Plan, step: PlannedStep, current: Manifest | None,
              inputs: dict[str, Manifest], force: bool) -> Manifest:  # fmt: skip
    return steps.run_step(recipe, source, plan, step, current, inputs, force)


def _run_name() -> str:
    path = flow_run.parameters.get("recipe_path", "recipe")
    try:
        return f"convert {load_recipe(path).name} ({path})"
    except Exception:
        return f"convert {path}"


def hardware_tags(step: PlannedStep) -> list[str]:
    """`gpu` for a step that will use this machine's CUDA device: a Prefect tag concurrency limit on `gpu`
    (`prefect concurrency-limit create gpu 1`) then keeps one GPU from being oversubscribed."""
    return ["gpu"] if "cuda" in step.hardware and "cuda" in hardware.available() else []


@flow(name="convert", flow_run_name=_run_name, log_prints=True)
def convert(recipe_path: str, only: list[str] | None = None, force: bool = False, source: str | None = None,
            output: str | None = None, dispatch_timeout: int | None = None) -> dict | State:  # fmt: skip
    """Build and validate every target of the recipe at `recipe_path` (or only the targets named in `only`),
    skipping targets whose validated artifact is up to date unless `force`; `source`, `output` and
    `dispatch_timeout` override the recipe's own. Returns the run's summary; a run in which a target failed ends
    Failed with the summary as its data, one stopped by bad input or a busy output ends Failed with one line, both
    messages starting with the exit code (`exit 1: ...`, see pipeline.types.ExitCode)."""
    started = now()
    try:
        recipe = load_recipe(recipe_path).with_overrides(only, source, output)
        plan = make_plan(recipe)
        handoff = Handoff(recipe_path, source, output, force, dispatch_timeout or recipe.dispatch_timeout_s)
        with output_lock(recipe.output_dir(), run_id=str(flow_run.id)):
            info = resolve_source(recipe, plan)
            if isinstance(info, str):
                raise InputError(info)
            manifests = steps.execute(plan, lambda step, current, inputs: run_step(recipe, info, plan, step, current,
                                                                                    inputs, handoff), info)  # fmt: skip
            summary = steps.summarize(recipe, info, manifests, started)
    except (InputError, OutputBusy, OSError) as exc:
        return Failed(message=f"exit {exit_code(exc).value}: {one_line(exc)}")
    publish(summary)
    counts = {s: sum(r["status"] == s for r in summary["targets"]) for s in Status}
    get_run_logger().info("%s: %s; summary in %s", recipe.name,
                          ", ".join(f"{n} {s}" for s, n in counts.items() if n), recipe.output_dir())  # fmt: skip
    failed = [row["target"] for row in summary["targets"] if row["status"] == Status.FAILED]
    if failed:
        return Failed(message=f"exit {ExitCode.FAILED.value}: {len(failed)} target(s) failed: {', '.join(failed)} "
                              f"(see {recipe.output_dir()})", data=summary)  # fmt: skip
    return summary


class Handoff(NamedTuple):
    """What a step handed to another pool needs to find its recipe and artifact, and how long it may wait there."""

    recipe_path: str
    source: str | None
    output: str | None
    force: bool
    timeout: int

    def parameters(self, target: str, step: Step) -> dict:
        """The `step` flow's parameters: where the recipe and the artifact are, never their data."""
        return {"recipe_path": self.recipe_path, "source": self.source, "output": self.output, "force": self.force,
                "target": target, "step": step.value}  # fmt: skip


def run_step(recipe: Recipe, info: SourceInfo, plan: Plan, step: PlannedStep, current: Manifest | None,
             inputs: dict[str, Manifest], handoff: Handoff) -> Manifest:  # fmt: skip
    """One step of the plan as a task here, or as a flow run on the hardware pool that `hardware.route` chooses
    (under a deployment only: outside one every step runs here, and one that cannot reports not_run)."""
    pool = None
    if deployment.id is not None and step.step != Step.PUBLISH:
        pool = hardware.route(step.hardware, hardware.available(), recipe.hardware_fallback, workers_online)
    if pool is None:
        task = step_task.with_options(tags=hardware_tags(step))
        return task(recipe, info, plan, step, current, inputs, handoff.force)
    return dispatch(pool, recipe, info, plan, step, current, handoff)


def workers_online(pool: str) -> bool:
    """Whether a worker of work pool `pool` is online (has sent a heartbeat recently)."""
    from prefect import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        try:
            workers = client.read_workers_for_work_pool(pool)
        except ObjectNotFound:
            return False
        except PrefectHTTPStatusError as exc:  # the sync client's answer for a pool that does not exist
            if exc.response.status_code == 404:
                return False
            raise
    return any(w.status == WorkerStatus.ONLINE for w in workers)


def dispatch(pool: str, recipe: Recipe, info: SourceInfo, plan: Plan, step: PlannedStep, current: Manifest | None,
             handoff: Handoff) -> Manifest:  # fmt: skip
    """Run `step` as a flow run of `step/<pool>` on that hardware's pool, passing where the recipe and artifact are
    (shared storage), not their data; record not_run when no worker there finishes it within the timeout."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled

    fmt, target = plan.formats[step.key], step.target
    code, logger = f"no_{pool}_worker", get_run_logger()

    def elsewhere(status: Status, code: str, why: str) -> Manifest:
        return steps.not_run_elsewhere(recipe, info, fmt, step.step, current, status, code, why,
                                       plan.inputs(info, step.key))  # fmt: skip

    try:
        run = run_deployment(f"step/{pool}", parameters=handoff.parameters(target.key, step.step),
                             timeout=handoff.timeout)  # fmt: skip
    except ObjectNotFound:
        return elsewhere(
            Status.NOT_RUN, code, f"no deployment step/{pool} to hand the step to (make deploy registers it)"
        )
    if run.state is None or not run.state.is_final():
        logger.warning("%s: no %s worker ran flow run %s within %d s; cancelling it", target.key, pool, run.name,
                       handoff.timeout)  # fmt: skip
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelled(message="no worker within the dispatch timeout"), force=True)
        return elsewhere(Status.NOT_RUN, code, f"no worker of pool {pool} ran step/{pool} (flow run {run.name}) "
                                               f"within {handoff.timeout} s")  # fmt: skip
    logger.info("%s: %s ran as flow run %s on pool %s: %s", target.key, step.step, run.name, pool, run.state.name)
    final = steps.published(recipe, target.key)
    candidate = candidate_dir(final)
    for folder in (final, candidate):
        storage.pull(recipe.output, recipe.name, folder.name)
    done = read_manifest(candidate) or read_manifest(final)
    if not run.state.is_completed() or done is None:
        return elsewhere(
            Status.FAILED,
            f"{step.step}_on_{pool}",
            f"flow run {run.name} on pool {pool} ended {run.state.name}: {run.state.message}",
        )
    # a build step that leaves no candidate but an `ok` published artifact found it up to date
    return done.model_copy(update={"resumed": step.step == Step.BUILD and read_manifest(candidate) is None})


def publish(summary: dict) -> None:
    """The run's results as Prefect artifacts: a table, and a markdown note linking the manifests."""
    key = "convert-" + "".join(c if c.isalnum() else "-" for c in summary["model"].lower())
    columns = ["target", "status", "size_mb", "bits_per_weight", "ppl", "ppl_ratio", "kl_mean", "kl_p99", "top1",
               "tokens_per_s", "build_s", "validate_s", "validated_on", "reason"]  # fmt: skip
    create_table_artifact(
        [{c: row.get(c) for c in columns} for row in summary["targets"]],
        key=key,
        description=f"weightsmith results for {summary['model']}",
    )
    lines = [f"# {summary['model']}", "", f"source: `{summary['source']['spec']}`; report: `{summary['report']}`", ""]
    lines += [
        f"- **{r['target']}**: {r['status']}"
        + (f" ({r['reason']})" if r["reason"] else "")
        + f" — manifest `{r['manifest']}`"
        for r in summary["targets"]
    ]
    create_markdown_artifact("\n".join(lines), key=f"{key}-summary", description="manifests of this run")
