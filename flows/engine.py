"""The `engine` Prefect flow: one target's engine step (TensorRT-LLM build and smoke test) on a worker of the
hardware pool it needs. `convert` hands the step here, by deployment (`engine/cuda` in prefect.yaml), when it runs
on a machine without that hardware; the artifact is found on the shared output storage, and the manifest there is
updated in place.
"""

from __future__ import annotations

from prefect import flow

from pipeline import convert as steps
from pipeline.artifacts import read_manifest
from pipeline.recipe import load_recipe
from pipeline.source import resolve_source


@flow(name="engine", flow_run_name="engine {target} ({recipe_path})", log_prints=True)
def engine_step(recipe_path: str, target: str, source: str | None = None, output: str | None = None) -> dict:
    recipe = load_recipe(recipe_path).select([target]).with_source(source)
    if output:
        recipe = recipe.model_copy(update={"output": output})
    info = resolve_source(recipe.source, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code)
    entry = recipe.target(target)
    validated = read_manifest(recipe.output_dir() / entry.folder)
    if validated is None:
        raise FileNotFoundError(f"no artifact for {target} under {recipe.output_dir()}: is the output storage shared?")
    return steps.engine_target(recipe, info, entry, validated).model_dump(mode="json")
