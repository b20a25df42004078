"""GPTQ beyond Llama-style layers (issue 17): the layer walker takes each layer's inputs from the model's own forward
(embedding scales, rope and masks per layer type, linear attention, per-layer inputs, latent attention), so Gemma 2/3/4,
Granite, Phi-3, the Qwen 3.5 hybrids, Qwen3-Next and DeepSeek-V3 quantize. Each architecture's gptq/int4 artifact is
built, loaded in transformers with GPTQModel's kernels and compared with transformers' float model by
tests/test_arch_matrix.py, which also checks that every listed linear is packed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline.archs import ARCHS, arch
from pipeline.formats.base import Format
from pipeline.source import inspect_checkpoint
from pipeline.types import Calibration, FormatError, Target
from tests.conftest import build_artifact

CALIBRATION = Calibration(samples=8, seq_len=64)
WALKED = sorted(m for m, row in ARCHS.items() if row.gptq)


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


def test_hybrid_layers_keep_their_decay_projections_in_float_and_say_so(tmp_path, tiny_model):
    """Qwen 3.5: the DeltaNet layer's in_proj_a/in_proj_b (a row per head) stay float16, and the config lists the
    linears that are packed, so that transformers' GPTQ loading does not expect the others packed too."""
    import json

    _, _, facts = build_artifact(tiny_model("qwen3_5_text"), ("gptq", "int4", {"group_size": 32}), tmp_path,
                                 calibration=CALIBRATION)  # fmt: skip
    found = load_file(tmp_path / "model.safetensors")
    assert found["model.layers.0.linear_attn.in_proj_a.weight"].dtype == torch.float16
    assert (
        "model.layers.0.linear_attn.in_proj_qkv.qweight" in found and "model.layers.1.self_attn.q_proj.qweight" in found
    )
    assert facts["layers"][0]["float_linears"] == ["linear_attn.in_proj_a", "linear_attn.in_proj_b"]
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "linear_attn.in_proj_qkv" in config["modules_in_block_to_quantize"][0]
    assert "linear_attn.in_proj_a" not in config["modules_in_block_to_quantize"][0]


def test_fused_experts_need_a_group_size_that_divides_their_input(tiny_model):
    """Experts stored fused ([experts, in, out], gpt-oss) are 3-D: their input size is their middle axis (gpt-oss-20b's
    2880 takes groups of 32 or 64, not 128)."""
    source = inspect_checkpoint(tiny_model("gpt_oss"))
    fmt = Format.for_target(Target(format="gptq", quant="int4", options={"group_size": 128}))
    with pytest.raises(FormatError, match=r"group size 128 does not divide the input size 64 of \S+\.experts\."):
        fmt.check(source)
    Format.for_target(Target(format="gptq", quant="int4", options={"group_size": 32})).check(source)


def test_mxfp4_packed_experts_are_refused_with_the_way_out(tiny_model, tmp_path):
    """gpt-oss as released keeps its experts in MXFP4 (`gate_up_proj_blocks`/`_scales`): refused, saying how to get
    the float checkpoint the quantizer reads."""
    import shutil

    from safetensors.torch import save_file

    folder = tiny_model("gpt_oss")
    for file in folder.iterdir():
        if file.is_file() and file.name != "model.safetensors":
            shutil.copy(file, tmp_path / file.name)
    state = load_file(folder / "model.safetensors")
    packed = {n.replace("experts.gate_up_proj", "experts.gate_up_proj_blocks") if n.endswith("gate_up_proj") else n: t
              for n, t in state.items()}  # fmt: skip
    save_file(packed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"MXFP4-packed expert tensor.*Mxfp4Config\(dequantize=True\)"):
        Format.for_target(Target(format="gptq", quant="int4", options={"group_size": 32})).check(
            inspect_checkpoint(tmp_path)
        )


@pytest.mark.parametrize("shared", [False, True])
def test_shared_experts_stay_in_float_unless_the_recipe_asks(tmp_path, tiny_model, shared):
    """Qwen 3.5 MoE's shared expert (every token goes through it) stays float16 like the router by default, listed
    among the float linears; `shared_experts: true` packs it like the routed experts."""
    import json

    options = {"group_size": 32, "shared_experts": shared}
    _, _, facts = build_artifact(tiny_model("qwen3_5_moe_text"), ("gptq", "int4", options), tmp_path,
                                 calibration=CALIBRATION)  # fmt: skip
    found = load_file(tmp_path / "model.safetensors")
    packed = "model.layers.0.mlp.shared_expert.down_proj.qweight" in found
    assert packed == shared and facts["shared_experts"] == ("quantized" if shared else "float16")
    assert ("model.layers.0.mlp.shared_expert.down_proj.weight" in found) == (not shared)
    assert "model.layers.0.mlp.experts.3.down_proj.qweight" in found  # the routed experts either way
    assert "model.layers.0.mlp.shared_expert_gate.weight" in found
    listed = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules_in_block_to_quantize"]
    assert ("mlp.shared_expert.down_proj" in listed[0]) == shared


def test_a_multimodal_checkpoint_keeps_its_vision_tower_and_loads_whole(tmp_path, tiny_model):
    """Qwen 3.5 as released: GPTQ quantizes the language model (`model.language_model.*`) and keeps the vision tower
    in float16; the artifact loads whole in transformers' image-text model with GPTQModel's kernels in the language
    model's linears only, and its text logits are those of the text-only load that validation uses."""
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GPTQConfig

    _, _, facts = build_artifact(tiny_model("qwen3_5"), ("gptq", "int4", {"group_size": 32}), tmp_path,
                                 calibration=CALIBRATION)  # fmt: skip
    found = load_file(tmp_path / "model.safetensors")
    assert "model.language_model.layers.3.self_attn.q_proj.qweight" in found
    vision = [n for n in found if n.startswith("model.visual.")]
    assert vision and all(found[n].dtype == torch.float16 for n in vision)
    ids = torch.tensor([list(range(5, 37))])
    loaded = {}
    for name, auto in (("text", AutoModelForCausalLM), ("whole", AutoModelForImageTextToText)):
        model = auto.from_pretrained(tmp_path, quantization_config=GPTQConfig(bits=4, backend="torch"),
                                     device_map="cpu", dtype=torch.float32).eval()  # fmt: skip
        packed = sorted(n for n, m in model.named_modules() if hasattr(m, "qweight"))
        with torch.inference_mode():
            loaded[name] = packed, model(input_ids=ids).logits
    packed = loaded["whole"][0]
    assert packed and not any("visual" in n for n in packed), packed[:3]
    assert len(packed) == len(loaded["text"][0])
    assert torch.allclose(loaded["whole"][1], loaded["text"][1], atol=1e-4)


def test_gemma4_moe_variant_is_refused_before_anything_is_written(tiny_model):
    """Gemma 4's MoE variant keeps its experts fused beside each layer's MLP, where the gemma4_text row places none:
    refused up front in one line naming GPTQ, the architecture and the experts found."""
    fmt = Format.for_target(Target(format="gptq", quant="int4", options={"group_size": 32}))
    with pytest.raises(FormatError) as refused:
        fmt.check(inspect_checkpoint(tiny_model("gemma4_text-moe")))
    message = str(refused.value)
    assert message.startswith("GPTQ:") and "gemma4_text row" in message, message
    assert "model.layers.0.experts." in message and "\n" not in message
