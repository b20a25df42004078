"""The `step` Prefect flow: one step of one target (build, smoke test, or engine build and run) on a worker of the
hardware pool it prefers or needs. `convert` hands a step here, by deployment (`step/cuda`, `step/apple` in
prefect.yaml), when it runs on a machine without that hardware. Only locations travel: the recipe path and the
target's key go in, the artifact is read from and written to the shared output storage, its manifest updated in
place; the flow returns the manifest's status.
"""

from __future__ import annotations

from prefect import flow

from pipeline import convert as steps
from pipeline import storage
from pipeline.artifacts import read_manifest
from pipeline.recipe import load_recipe
from pipeline.source import resolve_source

STEPS = ("build", "smoke", "engine")


@flow(name="step", flow_run_name="{step} {target} ({recipe_path})", log_prints=True)
def run_step(recipe_path: str, target: str, step: str, source: str | None = None, output: str | None = None,
             force: bool = False) -> str:  # fmt: skip
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r} (steps: {', '.join(STEPS)})")
    recipe = load_recipe(recipe_path).select([target]).with_source(source)
    if output:
        recipe = recipe.model_copy(update={"output": output})
    info = resolve_source(recipe.source, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code)
    entry = recipe.target(target)
    if step == "build":
        return steps.build_target(recipe, info, entry, force).status
    storage.pull(recipe.output, recipe.name, entry.folder)
    current = read_manifest(recipe.output_dir() / entry.folder)
    if current is None:
        raise FileNotFoundError(f"no artifact for {target} under {recipe.output_dir()}: is the output storage shared?")
    run = steps.validate_target if step == "smoke" else steps.engine_target
    return run(recipe, info, entry, current).status
