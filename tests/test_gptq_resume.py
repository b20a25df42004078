"""GPTQ resumes per layer: a run killed mid-model continues after its last finished layer, byte for byte the same."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap

import yaml

from tests.conftest import REPO, build_artifact, run_target, write_recipe

# a real SIGKILL right after layer 2 of 4 is stored: no handler, no cleanup runs
KILLED_AFTER_LAYER_2 = textwrap.dedent("""
    import os, signal, sys
    from pipeline.quantizers.resume import LayerStore

    save = LayerStore.save

    def save_then_die(self, index, *args):
        save(self, index, *args)
        if index == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    LayerStore.save = save_then_die
    from pipeline.cli import main

    sys.exit(main(["convert", "--no-prefect", sys.argv[1]]))
""")
OPTIONS = {"group_size": 32, "threads": 1}
CALIBRATION = {"samples": 16, "seq_len": 64}


def convert(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_killed_gptq_run_resumes_after_its_last_finished_layer_with_identical_output(tiny_model, tmp_path, caplog):
    from pipeline.types import Calibration

    source = tiny_model("llama-4-layers")
    path = write_recipe(tmp_path, source, [("gptq", "int4")])
    data = yaml.safe_load(path.read_text())
    data["targets"][0]["options"], data["calibration"] = OPTIONS, CALIBRATION
    path.write_text(yaml.safe_dump(data))
    root = tmp_path / "artifacts" / "test-model"

    killed = convert("-c", KILLED_AFTER_LAYER_2, str(path))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = root / ".gptq-int4.layers"
    kept = ["hidden-00001.safetensors", "key.json", "layer-00000.safetensors", "layer-00001.safetensors"]
    assert sorted(p.name for p in store.iterdir()) == kept
    assert not (root / "gptq-int4").exists()

    from pipeline.convert import prepare
    from pipeline.recipe import load_recipe
    from pipeline.types import Status, Step

    recipe = load_recipe(path)  # the rerun's build step, as `weightsmith convert` runs it (its validation: test_gptq)
    with caplog.at_level(logging.INFO, logger="weightsmith"):
        manifest = run_target(recipe, prepare(recipe), "gptq/int4", steps={Step.BUILD})
    assert manifest.status == Status.BUILT, manifest.reason
    assert "gptq: resuming after layer 2/4" in caplog.text
    assert "gptq: layer 3/4" in caplog.text and "gptq: layer 2/4" not in caplog.text  # layers 1 and 2 not redone
    assert [e["layer"] for e in manifest.build["layers"]] == [0, 1, 2, 3]
    assert not store.exists()  # removed once the checkpoint was complete
    rebuilt = root / ".gptq-int4.candidate" / "model.safetensors"

    whole = tmp_path / "uninterrupted"
    whole.mkdir()
    build_artifact(source, ("gptq", "int4", OPTIONS), whole, calibration=Calibration(**CALIBRATION))
    assert (whole / "model.safetensors").read_bytes() == rebuilt.read_bytes()


def test_finished_layers_from_other_inputs_are_not_reused(tmp_path):
    import torch

    from pipeline.quantizers.resume import LayerStore

    hidden = [torch.ones(2, 3)]
    store = LayerStore(tmp_path / "layers", {"samples": "a"})
    for index in range(2):
        store.save(index, [("w", torch.full((2,), float(index)))], {"layer": index}, hidden)
    assert LayerStore(tmp_path / "layers", {"samples": "a"}).finished() == 2
    written, entry = store.load(1)
    assert entry == {"layer": 1} and written[0][0] == "w" and written[0][1].tolist() == [1.0, 1.0]
    (tmp_path / "layers" / "hidden-00001.safetensors").unlink()  # activations lost: layer 2 cannot be resumed from
    assert LayerStore(tmp_path / "layers", {"samples": "a"}).finished() == 0  # (only the newest are kept)
    assert LayerStore(tmp_path / "layers", {"samples": "b"}).finished() == 0  # other calibration: start afresh
