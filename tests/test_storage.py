"""Output storage addressed by URL (fsspec). `file://` goes through the same fsspec calls as `s3://` or `gs://`."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.conftest import write_recipe


@pytest.fixture
def url_recipe(tiny_llama, tmp_path, monkeypatch):
    """A recipe whose output is a file:// URL, and a private weightsmith cache for the local mirror."""
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    path = write_recipe(tmp_path, tiny_llama, [("gguf", "f16")])
    data = yaml.safe_load(path.read_text())
    data["output"] = f"file://{tmp_path / 'store'}"
    path.write_text(yaml.safe_dump(data))
    return path


def test_artifacts_go_to_the_url_and_a_fresh_machine_resumes_from_it(url_recipe, tmp_path):
    from pipeline import storage
    from pipeline.convert import run_recipe
    from pipeline.recipe import load_recipe

    recipe = load_recipe(url_recipe)
    first = run_recipe(recipe)
    assert [r["status"] for r in first["targets"]] == ["ok"]
    stored = tmp_path / "store" / "test-model"
    manifest = json.loads((stored / "gguf-f16" / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert sorted(p.name for p in (stored / "gguf-f16").iterdir()) == sorted(
        ["manifest.json", *(f["path"] for f in manifest["files"])]
    )
    assert {"summary.json", "report.html", "report.md", "report.png"} <= {p.name for p in stored.iterdir()}
    assert recipe.output_dir() == storage.mirror(recipe.output) / "test-model"

    shutil.rmtree(recipe.output_dir())  # another machine: nothing local, everything on the storage
    again = run_recipe(load_recipe(url_recipe))
    assert [r["resumed"] for r in again["targets"]] == [True]
    assert json.loads((stored / "gguf-f16" / "manifest.json").read_text()) == manifest


def test_a_half_uploaded_artifact_is_not_taken_for_complete(url_recipe, tmp_path):
    from pipeline.convert import run_recipe
    from pipeline.recipe import load_recipe

    recipe = load_recipe(url_recipe)
    run_recipe(recipe)
    stored = tmp_path / "store" / "test-model" / "gguf-f16"
    (stored / "manifest.json").unlink()  # a push cut off before its last file: the manifest goes up last
    shutil.rmtree(recipe.output_dir())
    rerun = run_recipe(load_recipe(url_recipe))
    assert [(r["status"], r["resumed"]) for r in rerun["targets"]] == [("ok", False)]
    assert json.loads((stored / "manifest.json").read_text())["status"] == "ok"


def test_an_output_url_without_its_storage_backend_is_a_recipe_error(tiny_llama, tmp_path):
    from pipeline.recipe import RecipeError, load_recipe

    path = write_recipe(tmp_path, tiny_llama, [("gguf", "f16")])
    data = yaml.safe_load(path.read_text())
    data["output"] = "nosuchscheme://bucket/models"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"recipe.yaml:\d+: output: no storage backend for nosuchscheme://"):
        load_recipe(path)


def test_a_step_on_another_machine_pulls_the_artifacts_its_target_is_made_from(tiny_llama, tmp_path, monkeypatch):
    """w4a16_gptq is made from the GPTQ artifact: a worker whose mirror is empty must fetch that one too."""
    from pipeline.convert import prepare
    from pipeline.recipe import load_recipe
    from pipeline.types import Status, Step
    from tests.conftest import run_target

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    path = write_recipe(tmp_path, tiny_llama, [("gptq", "int4"), ("tensorrt", "w4a16_gptq")])
    data = yaml.safe_load(path.read_text())
    data["output"] = f"file://{tmp_path / 'store'}"
    data["targets"][0]["options"] = {"group_size": 32}
    data["calibration"] = {"samples": 4, "seq_len": 64}
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    source = prepare(recipe)
    gptq = run_target(recipe, source, "gptq/int4")
    assert gptq.status == Status.OK
    shutil.rmtree(recipe.output_dir())  # the worker that builds the TensorRT checkpoint has nothing local
    built = run_target(recipe, source, "tensorrt/w4a16_gptq", [Step.BUILD], inputs={"gptq/int4": gptq})
    assert built.status == Status.BUILT, built.reason
    assert (recipe.output_dir() / "gptq-int4" / "model.safetensors").is_file()


@pytest.mark.parametrize("bad", ["../outside.txt", "/etc/passwd", "a/../../outside.txt", ""])
def test_a_stored_manifest_naming_paths_outside_its_folder_is_refused(tmp_path, monkeypatch, bad):
    from pipeline import storage

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    stored = tmp_path / "store" / "model" / "gguf-f16"
    stored.mkdir(parents=True)
    (stored / "manifest.json").write_text(json.dumps({"files": [{"path": bad, "size": 1, "sha256": "0" * 64}]}))
    with pytest.raises(storage.StorageError, match="which leaves its artifact folder: refused"):
        storage.pull(f"file://{tmp_path / 'store'}", "model", "gguf-f16")
    assert not (tmp_path / "cache" / "outside.txt").exists()
    assert not (storage.mirror(f"file://{tmp_path / 'store'}") / "model" / "gguf-f16").exists()


def test_a_pull_does_not_take_files_newer_than_their_manifest(url_recipe, tmp_path):
    """A push cut off after some files but before the manifest: the stored manifest's hashes do not match."""
    from pipeline import storage
    from pipeline.convert import run_recipe
    from pipeline.recipe import load_recipe

    recipe = load_recipe(url_recipe)
    run_recipe(recipe)
    stored = tmp_path / "store" / "test-model" / "gguf-f16"
    gguf = next(stored.glob("*.gguf"))
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"x")  # a new file, its manifest not yet uploaded
    shutil.rmtree(recipe.output_dir())
    storage.pull(recipe.output, recipe.name, "gguf-f16")
    assert not (recipe.output_dir() / "gguf-f16").exists()
