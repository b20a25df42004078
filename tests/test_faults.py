"""Faults: a run killed at any moment, and two runs into one output. After each kill every published artifact must
still match its manifest's hashes and pass validation in its runtime, and a rerun must finish the job.

`WEIGHTSMITH_FAULT_POINTS` sets how many kill points the fault-injection test tries (20 by default; `.ci/run` uses
fewer, to stay within CI's time).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, write_recipe

POINTS = int(os.environ.get("WEIGHTSMITH_FAULT_POINTS", "20"))


def start(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "convert", str(recipe), "--no-prefect", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def check_published(model_dir: Path) -> list[str]:
    """Every published artifact (a folder with files and an ok manifest) matches its hashes and passes validation."""
    from pipeline.artifacts import read_manifest, verify_files
    from pipeline.formats.base import Format
    from pipeline.reference import reference
    from pipeline.source import inspect_checkpoint
    from pipeline.types import Status, Target, Validation

    checked = []
    for folder in sorted(p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest = read_manifest(folder)
        assert manifest is not None, f"{folder.name} has no manifest: a folder that looks published is half-written"
        if not manifest.files:
            continue  # a record of why there is no artifact
        assert manifest.status == Status.OK, (folder.name, manifest.status, manifest.reason)
        assert verify_files(folder, manifest) == [], folder.name
        fmt = Format.for_target(Target(**manifest.recipe_entry))
        validation = Validation(eval_tokens=128, context=64, max_new_tokens=4, prompts=["Hello."])
        source = inspect_checkpoint(Path(manifest.source["path"]))
        result = fmt.validate(folder, reference(source, validation), validation)
        assert result["failures"] == [] and result["quality"]["ppl_ratio"] < 1.1, (folder.name, result["failures"])
        checked.append(folder.name)
    return checked


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_bad_published_artifact(tiny_llama, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llama, [("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_0")])
    model_dir = tmp_path / "artifacts" / "test-model"
    began = time.monotonic()
    full = start(recipe, "--force")
    assert full.wait(timeout=600) == 0, full.stderr.read()
    duration = time.monotonic() - began
    assert set(check_published(model_dir)) == {"gguf-f16", "gguf-q8_0", "gguf-q4_0"}
    rng = random.Random(int(os.environ.get("WEIGHTSMITH_FAULT_SEED", "0")))
    for point in sorted(rng.uniform(0.5, duration) for _ in range(POINTS)):
        run = start(recipe, "--force")  # every target rebuilt: kills land in build, validation and publish
        time.sleep(point)
        run.send_signal(signal.SIGKILL)
        run.wait()
        check_published(model_dir)  # whatever was published before or during the killed run is intact
    rerun = start(recipe)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    assert set(check_published(model_dir)) == {"gguf-f16", "gguf-q8_0", "gguf-q4_0"}
    assert [p.name for p in model_dir.iterdir() if p.name.startswith(".")] == [".weightsmith.lock"]


def test_two_runs_into_one_output(tiny_llama, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llama, [("gguf", "f16")])
    first, second = start(recipe), start(recipe)
    outcomes = sorted((run.wait(timeout=600), run.stderr.read()) for run in (first, second))
    (done, _), (busy, message) = outcomes
    assert done == 0 and busy == 3, outcomes
    errors = [line for line in message.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "another run is writing here (pid " in errors[0] and "Traceback" not in message
    assert check_published(tmp_path / "artifacts" / "test-model") == ["gguf-f16"]
