"""Memory and disk estimates, checked before anything runs: a plan that will not fit is refused in one line."""

from __future__ import annotations

import pytest

from pipeline import cli
from pipeline import convert as steps
from pipeline.checkpoint import Checkpoint
from pipeline.formats.base import Format
from pipeline.recipe import load_recipe
from pipeline.resources import GB, Needs, model_size, shortfalls
from pipeline.types import Calibration, Step, Target, Validation
from tests.conftest import write_recipe


def test_model_size_from_the_headers(tiny_llama):
    checkpoint = Checkpoint(tiny_llama)
    size = model_size(checkpoint, {"hidden_size": 64, "vocab_size": 49152})
    tensors = {name: checkpoint.tensor(name) for name in checkpoint.names()}
    assert size.n_params == sum(t.numel() for t in tensors.values())
    assert size.stored == sum(t.numel() * t.element_size() for t in tensors.values())
    layer0 = sum(t.numel() * t.element_size() for n, t in tensors.items() if n.startswith("model.layers.0."))
    assert size.largest_layer == layer0 and size.largest_tensor == max(t.numel() for t in tensors.values())
    assert size.float32 == 4 * size.n_params and size.largest_shard == size.stored  # one shard


@pytest.mark.parametrize(("target", "bits"), [(("gguf", "q4_k_m"), 4.9), (("gguf", "f16"), 16), (("mlx", "q4"), 4.5),
                                              (("onnx", "fp32"), 32), (("gptq", "int4"), 4.5)])  # fmt: skip
def test_each_format_estimates_its_artifact_from_its_bits(tiny_llama, target, bits):
    size = model_size(Checkpoint(tiny_llama), {"hidden_size": 64, "vocab_size": 49152})
    fmt = Format.for_target(Target(format=target[0], quant=target[1]))
    needs = fmt.needs(size, Validation(), Calibration())
    assert needs.disk >= size.at_bits(bits) and {Step.BUILD, Step.VALIDATE} <= set(needs.memory)
    assert all(v > 0 for v in needs.memory.values())


def test_what_does_not_fit_is_named():
    needs = {"gguf/f16": Needs({Step.BUILD: 2 * GB, Step.VALIDATE: 5 * GB}, disk=3 * GB),
             "mlx/q4": Needs({Step.BUILD: 1 * GB}, disk=1 * GB)}  # fmt: skip
    assert shortfalls(needs, 4 * GB, memory_free=8 * GB, disk_free=10 * GB) == []
    memory, disk = shortfalls(needs, 4 * GB, memory_free=6 * GB, disk_free=3 * GB)
    assert memory == "gguf/f16 validate needs about 6.5 GB of memory, 6.0 GB is available"
    assert disk == "the artifacts need about 4.0 GB on the output's disk, 3.0 GB is free"
    (reference,) = shortfalls({}, 9 * GB, memory_free=8 * GB, disk_free=1)
    assert reference.startswith("the reference pass needs about 10.5 GB")


def test_a_run_that_will_not_fit_is_refused_before_anything_is_written(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(steps, "machine_free", lambda output: (int(0.5 * GB), 100 * GB))
    path = write_recipe(tmp_path, tiny_llama, [("gguf", "f16")])
    assert cli.main(["convert", str(path), "--no-prefect"]) == 4  # the machine cannot do it
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # and progress lines
    # the validate step or the reference pass before it, whichever needs more (the reference when it is not cached)
    assert len(errors) == 1 and errors[0].startswith("error: test-model: ") and " needs about " in errors[0]
    assert "of memory, 0.5 GB is available" in errors[0] and "check_resources: false" in errors[0]
    output = load_recipe(path).output_dir()
    assert not output.exists() or not [p for p in output.iterdir() if p.name != ".weightsmith.lock"]


def test_check_resources_false_lets_the_run_go(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(steps, "machine_free", lambda output: (int(0.5 * GB), 100 * GB))
    path = write_recipe(tmp_path, tiny_llama, [("gguf", "f16")])
    recipe = load_recipe(path).model_copy(update={"check_resources": False})
    assert steps.prepare(recipe).model_type == "llama"  # resolved and checked, not refused


def test_a_mixture_of_experts_counts_every_experts_hessians_in_gptq(tiny_model):
    from pipeline.source import inspect_checkpoint

    source = inspect_checkpoint(tiny_model("qwen3_moe"))
    size = model_size(Checkpoint(source.path), source.config())
    assert (size.experts, size.expert_inter) == (4, 64)
    fmt = Format.for_target(Target(format="gptq", quant="int4"))
    dense = fmt.needs(size.__class__(**{**size.__dict__, "experts": 0}), Validation(), Calibration())
    moe = fmt.needs(size, Validation(), Calibration())
    hessians = 4 * (size.hidden**2 + 64**2) * 4
    assert moe.memory[Step.BUILD] - dense.memory[Step.BUILD] >= hessians
