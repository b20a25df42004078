"""The `batch` Prefect flow: convert every recipe in a folder, each as its own `convert` subflow run.

One recipe failing (a bad recipe, a target out of budget) does not stop the others; the batch run ends failed when
any recipe failed, after a table artifact that lists every recipe's outcome. Scheduled nightly by the
`batch/nightly` deployment in prefect.yaml.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.states import Failed, State

from flows.convert import convert
from pipeline.types import Status


@flow(name="batch", flow_run_name="batch {folder}", log_prints=True)
def batch(folder: str = "recipes", pattern: str = "*.yaml", force: bool = False) -> list[dict] | State:
    """Convert every recipe matching `pattern` in `folder`; fail the run if any recipe failed."""
    paths = sorted(Path(folder).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no recipes matching {pattern} in {folder}")
    results = []
    for path in paths:
        state = convert(str(path), force=force, return_state=True)
        status = Status.OK if state.is_completed() else Status.FAILED
        row = {"recipe": str(path), "status": status.value, "detail": state.message}
        if state.is_completed():
            summary = state.result()
            row["detail"] = ", ".join(f"{r['target']} {r['status']}" for r in summary["targets"])
        results.append(row)
        get_run_logger().info("%s: %s (%s)", path, row["status"], row["detail"])
    create_table_artifact(results, key="batch-" + "".join(c if c.isalnum() else "-" for c in folder.lower()),
                          description=f"weightsmith batch over {folder}")  # fmt: skip
    failed = [r["recipe"] for r in results if r["status"] == Status.FAILED]
    if failed:
        return Failed(message=f"{len(failed)} of {len(results)} recipe(s) failed: {', '.join(failed)}", data=results)
    return results
