"""The `convert` Prefect flow: one recipe in, every artifact built and validated.

One task resolves the source (retried on transient network errors only), then each target gets a build task and a
validate task. The steps themselves are the library's (`pipeline.convert`); this module only adds Prefect: task
names, retries, a table artifact with the results, and a failed flow run when any target fails. It runs without a
Prefect server (ephemeral mode) as well as under a deployment.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from pipeline import convert as steps
from pipeline import hardware
from pipeline.artifacts import Manifest, now, read_manifest
from pipeline.formats import FORMATS, engine_not_run
from pipeline.recipe import Recipe, Target, load_recipe
from pipeline.source import SourceError, SourceInfo


class TargetsFailed(RuntimeError):
    """At least one target failed its build, smoke test or budget; the summary says which and why."""


def _transient(task, task_run, state) -> bool:
    """Retry only what may pass by itself: network and file-system hiccups, not a bad source."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) and not isinstance(exc, SourceError)


@task(name="resolve-source", retries=2, retry_delay_seconds=10, retry_condition_fn=_transient, cache_policy=NO_CACHE)
def resolve_source(recipe: Recipe) -> SourceInfo:
    return steps.prepare(recipe)


@task(name="build", task_run_name="build {target.format}/{target.quant}", cache_policy=NO_CACHE)
def build(recipe: Recipe, source: SourceInfo, target: Target, force: bool = False) -> Manifest:
    return steps.build_target(recipe, source, target, force)


@task(name="validate", task_run_name="validate {target.format}/{target.quant}", cache_policy=NO_CACHE)
def validate(recipe: Recipe, source: SourceInfo, target: Target, built: Manifest) -> Manifest:
    return steps.validate_target(recipe, source, target, built)


@task(name="engine", task_run_name="engine {target.format}/{target.quant}", cache_policy=NO_CACHE)
def engine(recipe: Recipe, source: SourceInfo, target: Target, validated: Manifest) -> Manifest:
    return steps.engine_target(recipe, source, target, validated)


def _run_name() -> str:
    path = flow_run.parameters.get("recipe_path", "recipe")
    try:
        return f"convert {load_recipe(path).name} ({path})"
    except Exception:
        return f"convert {path}"


def hardware_tags(target: Target, step: str) -> list[str]:
    """`gpu` for a step that will use this machine's CUDA device: a Prefect tag concurrency limit on `gpu`
    (`prefect concurrency-limit create gpu 1`) then keeps one GPU from being oversubscribed."""
    wanted = FORMATS[target.format].HARDWARE[step]
    return ["gpu"] if "cuda" in wanted and "cuda" in hardware.available() else []


@flow(name="convert", flow_run_name=_run_name, log_prints=True)
def convert(recipe_path: str, only: list[str] | None = None, force: bool = False, source: str | None = None,
            output: str | None = None, dispatch_timeout: int | None = None) -> dict:  # fmt: skip
    """Build and validate every target of the recipe at `recipe_path` (or only the targets named in `only`),
    skipping targets whose validated artifact is up to date unless `force`; `source`, `output` and
    `dispatch_timeout` override the recipe's own. Fail the run if any target fails."""
    started = now()
    recipe = load_recipe(recipe_path).select(only).with_source(source)
    if output:
        recipe = recipe.model_copy(update={"output": output})
    info = resolve_source(recipe)
    manifests = []
    for t in recipe.targets:
        built = build.with_options(tags=hardware_tags(t, "build"))(recipe, info, t, force)
        validated = validate.with_options(tags=hardware_tags(t, "smoke"))(recipe, info, t, built)
        if steps.has_engine(t) and validated.status == "ok" and not validated.resumed:
            validated = run_engine(recipe, info, t, validated, {"recipe_path": recipe_path, "source": source,
                                                                "output": output}, dispatch_timeout)  # fmt: skip
        manifests.append(validated)
    summary = steps.summarize(recipe, info, manifests, started)
    publish(summary)
    counts = {s: sum(r["status"] == s for r in summary["targets"]) for s in ("ok", "failed", "not_run")}
    get_run_logger().info(
        "%s: %d ok, %d failed, %d not run; summary in %s",
        recipe.name,
        counts["ok"],
        counts["failed"],
        counts["not_run"],
        recipe.output_dir(),
    )
    failed = [row["target"] for row in summary["targets"] if row["status"] == "failed"]
    if failed:
        raise TargetsFailed(f"{len(failed)} target(s) failed: {', '.join(failed)} (see {recipe.output_dir()})")
    return summary


def run_engine(recipe: Recipe, info: SourceInfo, target: Target, validated: Manifest, where: dict,
               timeout: int | None) -> Manifest:  # fmt: skip
    """The engine step here when this machine has the hardware, or outside a deployment (where it reports
    not_run); under a deployment on a machine without it, handed to the `engine/cuda` deployment's pool."""
    wanted = FORMATS[target.format].HARDWARE["engine"]
    if set(wanted) & hardware.available() or deployment.id is None:
        return engine.with_options(tags=hardware_tags(target, "engine"))(recipe, info, target, validated)
    return dispatch_engine(recipe, target, validated, wanted[0], where, timeout or recipe.dispatch_timeout_s)


def dispatch_engine(recipe: Recipe, target: Target, validated: Manifest, kind: str, where: dict,
                    timeout: int) -> Manifest:  # fmt: skip
    """Run the engine step as a flow run of `engine/<kind>` on that hardware's pool, passing where the artifact is
    (shared storage), not its data; record not_run when no worker there finishes it within `timeout` seconds."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled

    final = recipe.output_dir() / target.folder
    logger = get_run_logger()
    try:
        run = run_deployment(f"engine/{kind}", parameters={**where, "target": target.key}, timeout=timeout)
    except ObjectNotFound:
        why = f"no deployment engine/{kind} to hand the step to (make deploy registers it)"
        return steps.record_engine(final, validated, engine_not_run(f"no_{kind}_worker", why))
    if run.state is not None and run.state.is_final():
        logger.info("%s: engine step ran as flow run %s on pool %s: %s", target.key, run.name, kind, run.state.name)
        return read_manifest(final) or validated
    logger.warning("%s: no %s worker ran flow run %s within %d s; cancelling it", target.key, kind, run.name, timeout)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelled(message="no worker within the dispatch timeout"), force=True)
    why = f"no worker of pool {kind} ran engine/{kind} (flow run {run.name}) within {timeout} s"
    return steps.record_engine(final, validated, engine_not_run(f"no_{kind}_worker", why))


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
