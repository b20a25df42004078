"""The `batch` Prefect flow: convert every recipe in a folder, each as its own `convert` flow run.

Under a deployment (`batch/nightly` in prefect.yaml) every recipe is submitted at once as a flow run of the
`convert/recipe` deployment (`run_deployment`), so the `cpu` pool's workers on several machines convert them in
parallel; the batch waits for all of them and reads each outcome from the recipe's own `summary.json` on the shared
output. Run directly (no deployment), the recipes run one after another as subflows. Either way one recipe failing
(a bad recipe, a target out of budget) does not stop the others; the batch run ends failed when any recipe failed,
after a table artifact that lists every recipe's outcome.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import deployment
from prefect.states import Failed, State

from flows.convert import convert
from pipeline.artifacts import SUMMARY
from pipeline.recipe import load_recipe
from pipeline.types import Status

CONVERT = "convert/recipe"  # the deployment each recipe runs as (prefect.yaml)
POLL_S = 5


@flow(name="batch", flow_run_name="batch {folder}", log_prints=True)
def batch(folder: str = "recipes", pattern: str = "*.yaml", force: bool = False,
          timeout_s: int = 24 * 3600) -> list[dict] | State:  # fmt: skip
    """Convert every recipe matching `pattern` in `folder`; fail the run if any recipe failed."""
    paths = sorted(Path(folder).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no recipes matching {pattern} in {folder}")
    if deployment.id is not None:
        results = in_parallel(paths, force, timeout_s)
    else:
        results = [one_by_one(path, force) for path in paths]
    create_table_artifact(results, key="batch-" + "".join(c if c.isalnum() else "-" for c in folder.lower()),
                          description=f"weightsmith batch over {folder}")  # fmt: skip
    failed = [r["recipe"] for r in results if r["status"] == Status.FAILED]
    if failed:
        return Failed(message=f"{len(failed)} of {len(results)} recipe(s) failed: {', '.join(failed)}", data=results)
    return results


def one_by_one(path: Path, force: bool) -> dict:
    state = convert(str(path), force=force, return_state=True)
    row = {"recipe": str(path), "status": (Status.OK if state.is_completed() else Status.FAILED).value,
           "detail": state.message}  # fmt: skip
    if state.is_completed():
        row["detail"] = targets_line(state.result())
    get_run_logger().info("%s: %s (%s)", path, row["status"], row["detail"])
    return row


def in_parallel(paths: list[Path], force: bool, timeout_s: int) -> list[dict]:
    """Submit every recipe as a flow run of `convert/recipe`, then wait for all of them (at most `timeout_s`)."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    runs = {}
    for path in paths:
        run = run_deployment(CONVERT, parameters={"recipe_path": str(path.resolve()), "force": force}, timeout=0,
                             as_subflow=True)  # fmt: skip
        logger.info("%s: submitted as flow run %s", path, run.name)
        runs[path] = run.id
    deadline, states = time.monotonic() + timeout_s, {}
    with get_client(sync_client=True) as client:
        while len(states) < len(runs) and time.monotonic() < deadline:
            for path, run_id in runs.items():
                state = client.read_flow_run(run_id).state
                if path not in states and state is not None and state.is_final():
                    states[path] = state
            time.sleep(POLL_S if len(states) < len(runs) else 0)
    return [outcome(path, states.get(path)) for path in paths]


def outcome(path: Path, state) -> dict:
    """A recipe's row: its flow run's final state, with its targets from the summary.json it wrote."""
    if state is None:
        row = {"recipe": str(path), "status": Status.FAILED.value, "detail": "did not finish within the batch timeout"}
    else:
        row = {"recipe": str(path), "status": (Status.OK if state.is_completed() else Status.FAILED).value,
               "detail": state.message}  # fmt: skip
        summary = read_summary(path)
        if summary is not None:
            row["detail"] = targets_line(summary)
    get_run_logger().info("%s: %s (%s)", path, row["status"], row["detail"])
    return row


def read_summary(path: Path) -> dict | None:
    try:
        file = load_recipe(path).output_dir() / SUMMARY
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def targets_line(summary: dict) -> str:
    return ", ".join(f"{r['target']} {r['status']}" for r in summary["targets"])
