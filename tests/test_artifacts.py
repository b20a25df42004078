"""Artifact folders: complete or absent, never half-written, even when the process is killed mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline.artifacts import candidate_dir, read_manifest, verify_files
from pipeline.convert import prepare
from pipeline.files import staging_dir
from pipeline.recipe import load_recipe
from pipeline.types import Status, Step
from tests.conftest import run_target, write_recipe


def test_staging_dir_is_all_or_nothing(tmp_path):
    final = tmp_path / "model" / "gguf-f16"
    with pytest.raises(RuntimeError):
        with staging_dir(final) as tmp:
            (tmp / "half.gguf").write_bytes(b"GGUF")
            raise RuntimeError("disk full")
    assert not final.exists() and list((tmp_path / "model").iterdir()) == []

    with staging_dir(final) as tmp:
        (tmp / "a.gguf").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with staging_dir(final) as tmp:
            (tmp / "a.gguf").write_bytes(b"new, unfinished")
            raise RuntimeError("killed")
    assert (final / "a.gguf").read_bytes() == b"old"  # the previous artifact survives a failed rebuild

    with staging_dir(final) as tmp:
        (tmp / "b.gguf").write_bytes(b"new")
    assert sorted(p.name for p in final.iterdir()) == ["b.gguf"]


KILLED_BUILD = textwrap.dedent("""
    import sys, time
    import pipeline.formats.gguf as gguf_format
    from pipeline.convert import prepare
    from pipeline.recipe import load_recipe
    from tests.conftest import run_target

    convert_tensor = gguf_format.convert_tensor

    def slowly(*args, **kwargs):
        data = convert_tensor(*args, **kwargs)
        print("WRITING", flush=True)
        time.sleep(0.3)
        return data

    gguf_format.convert_tensor = slowly
    recipe = load_recipe(sys.argv[1])
    run_target(recipe, prepare(recipe), recipe.targets[0].key, force=True)
    print("FINISHED", flush=True)
""")


def kill_mid_build(recipe_path, repo_root) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(recipe_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    for _ in range(4):  # a few tensors are in the file: the writer is mid-way
        assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_kill_mid_write_leaves_nothing_that_looks_complete(tiny_llama, tmp_path):
    repo_root = __import__("pathlib").Path(__file__).resolve().parents[1]
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("gguf", "f16")]))
    model_dir = recipe.output_dir()

    kill_mid_build(tmp_path / "recipe.yaml", repo_root)
    assert not (model_dir / "gguf-f16").exists() and not candidate_dir(model_dir / "gguf-f16").exists()
    partial = [p for p in model_dir.iterdir() if ".partial-" in p.name]
    assert len(partial) == 1 and partial[0].name.startswith("..gguf-f16.candidate.partial-")
    assert list(partial[0].glob("*.gguf")) and not (partial[0] / "manifest.json").exists()

    source = prepare(recipe)  # the next run clears what the killed one left
    assert [p.name for p in model_dir.iterdir()] == []
    built = run_target(recipe, source, "gguf/f16", [Step.BUILD])
    assert built.status == Status.BUILT and verify_files(candidate_dir(model_dir / "gguf-f16"), built) == []
    assert not (model_dir / "gguf-f16").exists()  # built is not published: it has not been validated yet
    manifest = run_target(recipe, source, "gguf/f16")
    assert manifest.status == Status.OK and read_manifest(model_dir / "gguf-f16") == manifest

    kill_mid_build(tmp_path / "recipe.yaml", repo_root)  # a killed rebuild keeps the published artifact intact
    kept = read_manifest(model_dir / "gguf-f16")
    assert kept == manifest and verify_files(model_dir / "gguf-f16", kept) == []


def test_manifest_records_files_source_and_machine(tiny_llama, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("gguf", "q8_0")]))
    source = prepare(recipe)
    manifest = run_target(recipe, source, "gguf/q8_0", [Step.BUILD])
    folder = candidate_dir(recipe.output_dir() / "gguf-q8_0")
    assert read_manifest(folder) == manifest and manifest.steps == {Step.BUILD: Status.BUILT}
    (entry,) = manifest.files
    assert entry.path == "test-model-Q8_0.gguf" and entry.size == (folder / entry.path).stat().st_size
    assert manifest.source["fingerprint"] == source.fingerprint and manifest.source["files"]["model.safetensors"]
    assert manifest.recipe_entry == {"format": "gguf", "quant": "q8_0", "options": {}}
    assert manifest.versions["gguf"] and manifest.versions["torch"] and manifest.built_on["cpu_count"] >= 1
    assert manifest.build["tensor_types"] == {"Q8_0": 16, "F32": 5} and manifest.timings["build_s"] > 0

    (folder / entry.path).write_bytes(b"tampered")
    assert verify_files(folder, manifest) == [entry.path]
