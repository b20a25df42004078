"""The `step` Prefect flow: one step of one target (build, validate, or engine build and run) on a worker of the
hardware pool it prefers or needs. `convert` hands a step here, by deployment (`step/cuda`, `step/apple` in
prefect.yaml), when it runs on a machine without that hardware. Only locations travel: the recipe path and the
target's key go in, the artifact (its candidate folder) is read from and written to the shared output storage, its
manifest updated in place; the flow returns the manifest's status.
"""

from __future__ import annotations

from prefect import flow

from pipeline import convert as steps
from pipeline import storage
from pipeline.artifacts import candidate_dir, read_manifest
from pipeline.plan import make_plan
from pipeline.recipe import load_recipe
from pipeline.source import resolve_source
from pipeline.types import Status, Step

STEPS = (Step.BUILD, Step.VALIDATE, Step.ENGINE, Step.SERVE)


@flow(name="step", flow_run_name="{step} {target} ({recipe_path})", log_prints=True)
def run_step(recipe_path: str, target: str, step: str, source: str | None = None, output: str | None = None,
             force: bool = False) -> str:  # fmt: skip
    if step not in {s.value for s in STEPS}:
        raise ValueError(f"unknown step {step!r} (steps: {', '.join(s.value for s in STEPS)})")
    recipe = load_recipe(recipe_path).with_overrides([target], source, output)
    plan = make_plan(recipe)
    info = resolve_source(recipe.source, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code)
    planned = next(s for s in plan.steps if s.key == target and s.step == step)
    inputs = {}
    for key in planned.inputs:  # what it is made from: published by the run that handed this step over
        storage.pull(recipe.output, recipe.name, steps.published(recipe, key).name)
        inputs[key] = read_manifest(steps.published(recipe, key))
    current = None
    if planned.step != Step.BUILD:
        candidate = candidate_dir(steps.published(recipe, target))
        storage.pull(recipe.output, recipe.name, candidate.name)
        current = read_manifest(candidate)
        if current is None:
            raise FileNotFoundError(f"no candidate artifact for {target} under {recipe.output_dir()}: is the output "
                                    f"storage shared?")  # fmt: skip
    missing = [k for k, m in inputs.items() if m is None]
    if missing:
        raise FileNotFoundError(f"no published artifact for {', '.join(missing)} under {recipe.output_dir()}")
    result = steps.run_step(recipe, info, plan, planned, current, inputs, force)
    return Status(result.status).value
