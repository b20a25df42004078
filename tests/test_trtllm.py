"""TensorRT-LLM's PyTorch backend route: the Hugging Face folder it loads, validated here, run on a CUDA worker."""

from __future__ import annotations

import json
import shlex
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import Checkpoint
from pipeline.formats import trtllm
from pipeline.recipe import load_recipe
from pipeline.source import inspect_checkpoint
from pipeline.types import Status, Step
from tests.conftest import build_artifact, run_target, write_recipe


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama, tmp_path_factory):
    """The tiny llama re-saved in two shards, as the hub shards large models."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(folder, max_shard_size="10MB")
    for name in tiny_llama.iterdir():
        if name.name.startswith("tokenizer") or name.suffix == ".jinja":
            shutil.copy(name, folder / name.name)
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    return folder


@pytest.mark.parametrize("quant", ["bf16", "fp16"])
def test_every_tensor_is_the_source_in_the_target_dtype_shard_by_shard(sharded_llama, tmp_path, quant):
    out = tmp_path / quant
    out.mkdir()
    _, source, facts = build_artifact(sharded_llama, ("trtllm", quant), out)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[quant]
    original = Checkpoint(sharded_llama)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    seen = 0
    for file in out.glob("model-*.safetensors"):
        for name, tensor in load_file(file).items():
            assert index["weight_map"][name] == file.name and tensor.dtype == dtype
            assert torch.equal(tensor, original.tensor(name).to(dtype)), name
            seen += 1
    assert seen == len(original.names()) and facts["dtype"] == json.loads((out / "config.json").read_text())["dtype"]


def test_the_target_validates_here_and_leaves_the_gpu_run_not_run(tiny_llama, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("trtllm", "bf16")]))
    manifest = run_target(recipe, inspect_checkpoint(tiny_llama), "trtllm/bf16")
    assert manifest.steps[Step.VALIDATE] == Status.OK and manifest.quality["ppl_ratio"] < 1.01
    assert manifest.steps[Step.ENGINE] == Status.NOT_RUN and "no_cuda_device" in manifest.reason
    folder = recipe.output_dir() / "trtllm-bf16"
    assert list(folder.glob("*.safetensors"))  # published: the checkpoint passed; only the GPU run is missing
    line = next(x for x in (folder / "trtllm-serve.sh").read_text().splitlines() if x.startswith("exec "))
    argv = shlex.split(line)[1:]
    assert argv[:2] == ["trtllm-serve", "."] and argv[argv.index("--backend") + 1] == "pytorch"


def test_a_cuda_worker_without_tensorrt_llm_is_told_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    code, detail = trtllm.unavailable()
    assert code == "tensorrt_llm_not_installed" and "tensorrt-llm>=1.0" in detail


def test_a_tensorrt_llm_older_than_1_0_is_sent_to_the_engine_route(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", type(sys)("tensorrt_llm"))
    sys.modules["tensorrt_llm"].__version__ = "0.21.0"
    code, detail = trtllm.unavailable()
    assert code == "tensorrt_llm_version_mismatch" and "format tensorrt" in detail
