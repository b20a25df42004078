"""GPTQ beyond Llama-style layers (issue 17): the layer walker takes each layer's inputs from the model's own forward
(embedding scales, rope and masks per layer type, linear attention, per-layer inputs, latent attention), so Gemma 2/3/4,
Granite, Phi-3, the Qwen 3.5 hybrids, Qwen3-Next and DeepSeek-V3 quantize; the artifacts load in transformers with
GPTQModel's kernels and agree with our own dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.archs import ARCHS, arch
from pipeline.formats.base import Format
from pipeline.runtimes.transformers import _dequantized_runtime, cpu_workers, open_gptq
from pipeline.source import inspect_checkpoint
from pipeline.types import Calibration, FormatError, Target
from tests.conftest import build_artifact

CALIBRATION = Calibration(samples=8, seq_len=64)
WALKED = sorted(m for m, row in ARCHS.items() if row.gptq)
NEW = ["gemma2", "gemma3_text", "gemma4_text", "granite", "phi3", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next",
       "deepseek_v3"]  # fmt: skip


@pytest.mark.parametrize("model_type", WALKED)
def test_the_walker_reproduces_the_models_own_forward(tiny_model, model_type):
    """Every float layer walked one at a time on the captured arguments gives the decoder stack's own output: what
    GPTQ calibrates each layer on is what the model computes there."""
    from transformers import AutoModelForCausalLM

    from pipeline.quantizers.layers import LayerStream

    folder = tiny_model(model_type)
    row = arch(model_type)
    samples = [list(range(5 + i, 45 + i)) for i in range(3)]
    stream = LayerStream(inspect_checkpoint(folder), samples, row.gptq_linears, compute_dtype=torch.float32,
                         experts=row.gptq_experts, capture=True)  # fmt: skip
    for index in range(stream.n_layers):
        stream.advance(stream.load(index)[0], index)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = model.model(input_ids=torch.tensor(samples)).last_hidden_state
        ours = stream.model.model.norm(stream.hidden[0])
    gap = (theirs - ours).abs().max().item()
    assert gap < 1e-4 * max(1.0, theirs.abs().max().item()), f"{model_type}: max |Δhidden| {gap}"


@pytest.mark.parametrize("model_type", NEW)
def test_new_architectures_quantize_and_load_in_transformers(tmp_path, tiny_model, model_type):
    cpu_workers()
    folder = tiny_model(model_type)
    _, _, facts = build_artifact(folder, ("gptq", "int4", {"group_size": 32}), tmp_path, calibration=CALIBRATION)
    row, found = arch(model_type), load_file(tmp_path / "model.safetensors")
    layers = facts["layers"]
    for layer in layers:  # every listed linear the layer has is packed, and GPTQ beat round-to-nearest on it
        assert layer["errors"] and all(e["gptq"] < e["rtn"] for e in layer["errors"].values()), layer
        for name in layer["errors"]:
            assert f"model.layers.{layer['layer']}.{name}.qweight" in found
            assert f"model.layers.{layer['layer']}.{name}.weight" not in found
    quantized = {name for layer in layers for name in layer["errors"]}
    assert quantized <= set(row.gptq_linears)
    if row.gptq_experts:
        assert facts["expert_coverage"] and all(len(layer["expert_errors"]["gptq"]) == 4 for layer in layers
                                                if "expert_errors" in layer)  # fmt: skip
        assert any(n.endswith(".experts.3.down_proj.qweight") for n in found)
    ids = list(range(100, 140))
    ours = _dequantized_runtime(tmp_path).logits(ids)
    runtime = open_gptq(tmp_path)
    assert runtime.description["validated_by"].startswith("transformers")
    theirs = runtime.logits(ids)
    cosine = (theirs * ours).sum(-1) / np.linalg.norm(theirs, axis=-1) / np.linalg.norm(ours, axis=-1)
    assert cosine.min() > 0.9999 and (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.95


def test_hybrid_layers_keep_their_decay_projections_in_float_and_say_so(tmp_path, tiny_model):
    """Qwen 3.5: the DeltaNet layer's in_proj_a/in_proj_b (a row per head) stay float16, and the config lists the
    linears that are packed, so that transformers' GPTQ loading does not expect the others packed too."""
    import json

    _, _, facts = build_artifact(tiny_model("qwen3_5_text"), ("gptq", "int4", {"group_size": 32}), tmp_path,
                                 calibration=CALIBRATION)  # fmt: skip
    found = load_file(tmp_path / "model.safetensors")
    assert found["model.layers.0.linear_attn.in_proj_a.weight"].dtype == torch.float16
    assert "model.layers.0.linear_attn.in_proj_qkv.qweight" in found and "model.layers.1.self_attn.q_proj.qweight" in found
    assert facts["layers"][0]["float_linears"] == ["linear_attn.in_proj_a", "linear_attn.in_proj_b"]
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "linear_attn.in_proj_qkv" in config["modules_in_block_to_quantize"][0]
    assert "linear_attn.in_proj_a" not in config["modules_in_block_to_quantize"][0]


@pytest.mark.parametrize("model_type, why", [("gpt_oss", "stored fused"), ("llama4_text", "stored fused")])
def test_fused_expert_layouts_are_refused_with_the_reason(tiny_model, model_type, why):
    source = inspect_checkpoint(tiny_model(model_type))
    with pytest.raises(FormatError, match=rf"GPTQ does not support architecture '{model_type}': .*{why}"):
        Format.for_target(Target(format="gptq", quant="int4")).check(source)
