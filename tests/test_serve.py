"""The serve check: the artifact's own server script, run as written, answers the smoke test's prompts as our runtime
did; a server that fails, or answers otherwise, keeps the candidate from being published."""

from __future__ import annotations

import json
import shlex

import pytest

from pipeline.artifacts import summary_rows
from pipeline.recipe import load_recipe
from pipeline.serve import judge_reply, serve_check
from pipeline.source import inspect_checkpoint
from pipeline.types import Status, Step
from tests.conftest import run_target, write_recipe


@pytest.fixture(scope="module")
def gguf_run(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    recipe = load_recipe(write_recipe(folder, tiny_llama, [("gguf", "q8_0")]))
    return recipe, run_target(recipe, inspect_checkpoint(tiny_llama), "gguf/q8_0")


def test_the_gguf_answers_through_llama_cpps_server_as_in_our_runtime(gguf_run):
    recipe, manifest = gguf_run
    assert manifest.status == Status.OK and manifest.steps[Step.SERVE] == Status.OK, manifest.reason
    serve = manifest.serve
    assert serve["server"] == "llama.cpp's server" and serve["script"] == "llama-server.sh"
    (case,) = serve["cases"]
    expected = manifest.smoke["generation"]["cases"][0]["text"]
    assert case["text"].strip() == expected.strip() and case["text"].strip()
    assert case["finish_reason"] in ("stop", "length") and 0 < case["ttft_s"] <= case["total_s"]
    published = recipe.output_dir() / "gguf-q8_0"
    on_disk = json.loads((published / "manifest.json").read_text())
    assert on_disk["steps"]["serve"] == "ok" and on_disk["serve"]["cases"][0]["text"] == case["text"]
    (row,) = summary_rows([manifest])
    assert row["served"] == f"ok in llama.cpp's server, first token {case['ttft_s']:.2f} s"


def test_the_script_runs_relative_to_its_folder_and_takes_a_port(gguf_run):
    recipe, _ = gguf_run
    script = (recipe.output_dir() / "gguf-q8_0" / "llama-server.sh").read_text()
    commands = [shlex.split(line.strip())[1:] for line in script.splitlines() if line.strip().startswith("exec ")]
    assert commands[0][:3] == ["llama-server", "-m", commands[0][2]] and commands[0][-1] == "$@"
    assert commands[1][1:3] == ["-m", "llama_cpp.server"] and commands[1][-1] == "$@"
    assert not any(c.startswith("/") for c in commands[0] + commands[1] if c != "${PYTHON:-python3}")


def test_a_server_that_does_not_start_fails_the_check_naming_why(tmp_path):
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\necho 'error: model file missing' >&2\nexit 3\n")
    smoke = {"generation": {"cases": [{"prompt": "Hi", "text": "Hello"}]}}
    outcome = serve_check(script, "a server", smoke, [], 8, tmp_path / "log")
    assert outcome["status"] == Status.FAILED
    assert "exited with status 3" in outcome["reason"] and "model file missing" in outcome["reason"]


@pytest.mark.parametrize(("text", "problem"), [("Paris.", None), (" Paris. ", None), ("Lyon.", "our runtime"),
                                               ("Paris.<|im_end|>", "stop text"), ("Par\ufffdis.", None),
                                               ("Lyon\ufffd", "our runtime")])  # fmt: skip
def test_a_reply_must_be_ours_and_end_at_the_stop(text, problem):
    found = judge_reply({"prompt": "Capital?", "expected": "Paris.", "text": text}, ["<|im_end|>"], 8)
    assert found == [] if problem is None else any(problem in f for f in found)


def test_a_failing_serve_check_keeps_the_candidate_unpublished(tiny_llama, tmp_path, monkeypatch):
    from pipeline.formats.gguf import GGUF

    def broken(self, artifact, manifest, validation, log):
        return {"status": Status.FAILED, "server": self.server, "cases": [], "reason": "the server replied 'x'"}

    monkeypatch.setattr(GGUF, "serve", broken)
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("gguf", "f16")]))
    manifest = run_target(recipe, inspect_checkpoint(tiny_llama), "gguf/f16")
    assert manifest.status == Status.FAILED and manifest.reason == "serve check: the server replied 'x'"
    published = recipe.output_dir() / "gguf-f16"
    assert not list(published.glob("*.gguf"))  # only the record of why there is no artifact
    assert json.loads((published / "manifest.json").read_text())["steps"]["serve"] == "failed"


def test_without_a_server_the_check_is_not_run_and_the_artifact_stays_ok(tiny_llama, tmp_path, monkeypatch):
    from pipeline.formats.gguf import GGUF

    real = GGUF.missing_dependency
    monkeypatch.setattr(GGUF, "missing_dependency", lambda self, step: "no server here" if step == Step.SERVE
                        else real(self, step))  # fmt: skip
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("gguf", "f16")]))
    manifest = run_target(recipe, inspect_checkpoint(tiny_llama), "gguf/f16")
    assert manifest.status == Status.OK and manifest.steps[Step.SERVE] == Status.NOT_RUN
    assert manifest.serve["reason"] == "no server here"
    assert list((recipe.output_dir() / "gguf-f16").glob("*.gguf"))


def test_the_mlx_folder_answers_through_mlx_lm_server_as_mlx_lm_does_in_its_dtype(tiny_llama, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("mlx", "q8")]))
    manifest = run_target(recipe, inspect_checkpoint(tiny_llama), "mlx/q8")
    assert manifest.status == Status.OK and manifest.steps[Step.SERVE] == Status.OK, manifest.reason
    serve = manifest.serve
    assert serve["server"] == "mlx_lm.server" and "stored dtype" in serve["compared_with"]
    (case,) = serve["cases"]
    assert case["text"].strip() == case["expected"].strip() and case["text"].strip() and case["ttft_s"] > 0
