"""TensorRT-LLM: the prepared checkpoint against the source tensors, its config, the way back into transformers,
weight-only packing, the GPTQ route, and the honest not_run of the engine steps on a machine without CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import Checkpoint
from pipeline.formats import tensorrt as trt
from pipeline.types import Calibration, FormatError
from tests.conftest import build_artifact


def prepare(tiny_model, tmp_path, model="llama", quant="fp16", inputs=None, **options):
    out = tmp_path / f"tensorrt-{quant}"
    out.mkdir(exist_ok=True)
    _, source, facts = build_artifact(tiny_model(model), ("tensorrt", quant, options), out, inputs=inputs or {})
    return out, facts, source


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_every_prepared_tensor_is_the_hf_tensor_or_concatenation(tiny_model, tmp_path, model):
    out, facts, source = prepare(tiny_model, tmp_path, model)
    tensors, hf = load_file(out / "rank0.safetensors"), Checkpoint(source.path)
    config = source.config()
    expected = {"transformer.vocab_embedding.weight": hf.tensor("model.embed_tokens.weight"),
                "transformer.ln_f.weight": hf.tensor("model.norm.weight"),
                "lm_head.weight": hf.tensor("lm_head.weight" if "lm_head.weight" in hf.names()
                                            else "model.embed_tokens.weight")}  # fmt: skip
    for i in range(config["num_hidden_layers"]):
        t, h = f"transformer.layers.{i}", f"model.layers.{i}"
        w = lambda name, h=h: hf.tensor(f"{h}.{name}")
        expected |= {
            f"{t}.attention.qkv.weight": torch.cat(
                [w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"), w("self_attn.v_proj.weight")]
            ),  # fmt: skip
            f"{t}.attention.dense.weight": w("self_attn.o_proj.weight"),
            f"{t}.mlp.fc.weight": w("mlp.gate_proj.weight"),
            f"{t}.mlp.gate.weight": w("mlp.up_proj.weight"),
            f"{t}.mlp.proj.weight": w("mlp.down_proj.weight"),
            f"{t}.input_layernorm.weight": w("input_layernorm.weight"),
            f"{t}.post_layernorm.weight": w("post_attention_layernorm.weight"),
        }
        if model == "qwen2":
            expected[f"{t}.attention.qkv.bias"] = torch.cat([w("self_attn.q_proj.bias"), w("self_attn.k_proj.bias"),
                                                             w("self_attn.v_proj.bias")])  # fmt: skip
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, expected[name].to(torch.float16)), name
    assert facts["tensors"] == len(expected) and facts["quant_algo"] is None


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_config_follows_the_checkpoint_schema(tiny_model, tmp_path, model):
    out, _, source = prepare(tiny_model, tmp_path, model, "w8a16")
    config = json.loads((out / "config.json").read_text())
    parsed = trt.CheckpointConfig.model_validate(config)
    hf = source.config()
    assert parsed.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model]
    assert (parsed.hidden_size, parsed.num_hidden_layers, parsed.vocab_size) == (hf["hidden_size"],
                                                                                hf["num_hidden_layers"],
                                                                                hf["vocab_size"])  # fmt: skip
    assert parsed.num_key_value_heads == hf["num_key_value_heads"] and parsed.attn_bias == (model == "qwen2")
    assert parsed.head_size * parsed.num_attention_heads == hf["hidden_size"]
    assert parsed.mapping == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert parsed.quantization["quant_algo"] == "W8A16" and parsed.quantization["exclude_modules"] == ["lm_head"]
    assert parsed.rotary_base == hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta"))
    assert config["weightsmith"]["weight_layout"] == "unprocessed"


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_mapped_back_into_transformers_gives_identical_logits(tiny_model, tmp_path, model):
    from transformers import AutoModelForCausalLM

    out, _, source = prepare(tiny_model, tmp_path, model)
    state, _ = trt.to_transformers_state(out)
    original = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.copy_(p.half().float())  # the checkpoint is float16
    mapped = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    mapped.load_state_dict(state, strict=False)
    ids = torch.tensor([list(range(3, 43))])
    with torch.inference_mode():
        assert torch.equal(mapped(ids).logits, original(ids).logits)


@pytest.mark.parametrize("quant,bits", [("w8a16", 8), ("w4a16", 4)])
def test_weight_only_scales_and_packing_round_trip(tiny_model, tmp_path, quant, bits):
    out, _, source = prepare(tiny_model, tmp_path, "llama", quant)
    tensors, hf = load_file(out / "rank0.safetensors"), Checkpoint(source.path)
    weight = hf.tensor("model.layers.0.mlp.down_proj.weight").half().float()
    packed, scale = (
        tensors["transformer.layers.0.mlp.proj.weight"],
        tensors["transformer.layers.0.mlp.proj.per_channel_scale"],
    )
    assert packed.dtype == torch.int8 and scale.shape == (weight.shape[0],)
    assert packed.shape == (weight.shape[1], weight.shape[0] * bits // 8)  # [in, out] (int4: two a byte)
    top = 2 ** (bits - 1) - 1
    torch.testing.assert_close(scale.float(), (weight.abs().amax(dim=1) / top).half().float(), rtol=0, atol=0)
    dequantized = trt.dequantize(tensors, "transformer.layers.0.mlp.proj", {"quant_algo": quant.upper()})
    assert ((dequantized - weight).abs() <= scale.float()[:, None] * 0.5001).all()
    levels = torch.arange(-8, 8, dtype=torch.int8).repeat(4, 2)
    assert torch.equal(trt.unpack_int4(trt.pack_int4(levels)), levels)
    assert int(trt.pack_int4(torch.tensor([[1, -2]], dtype=torch.int8)).view(torch.uint8)) == 0xE1


def test_gptq_artifact_becomes_w4a16_gptq(tiny_model, tmp_path):
    from pipeline.quantizers.gptq import from_checkpoint

    gptq_dir = tmp_path / "gptq-int4"
    gptq_dir.mkdir()
    build_artifact(tiny_model("llama"), ("gptq", "int4", {"group_size": 32, "desc_act": True, "static_groups": True}),
                   gptq_dir, calibration=Calibration(samples=4, seq_len=64))  # fmt: skip
    int8 = tmp_path / "gptq-int8"
    int8.mkdir()
    build_artifact(tiny_model("llama"), ("gptq", "int8", {"group_size": 32}), int8,
                   calibration=Calibration(samples=4, seq_len=64))  # fmt: skip
    with pytest.raises(FormatError, match=r"gptq/int4 is a 8-bit GPTQ artifact; w4a16_gptq needs 4 bits"):
        prepare(tiny_model, tmp_path, "llama", "w4a16_gptq", inputs={"gptq/int4": int8})
    out, facts, _ = prepare(tiny_model, tmp_path, "llama", "w4a16_gptq", inputs={"gptq/int4": gptq_dir})
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config == {**config, "quant_algo": "W4A16_GPTQ", "group_size": 32, "has_zero_point": True}
    tensors, gptq_tensors = load_file(out / "rank0.safetensors"), load_file(gptq_dir / "model.safetensors")
    expected = torch.cat([from_checkpoint({k: gptq_tensors[f"model.layers.1.self_attn.{p}_proj.{k}"] for k in
                                           ("qweight", "qzeros", "scales", "g_idx")}, 4) for p in "qkv"])  # fmt: skip
    got = trt.dequantize(tensors, "transformer.layers.1.attention.qkv", config)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)  # zero·scale is stored in float16
    assert facts["gptq_artifact"] == "gptq-int4"


def test_without_cuda_the_checkpoint_is_validated_and_the_engine_not_run(tiny_llama, tmp_path):
    from pipeline.convert import run_recipe
    from pipeline.recipe import load_recipe
    from tests.conftest import write_recipe

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the engine steps would run")
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("tensorrt", "fp16")],
                                      budgets={"tensorrt/fp16": {"max_ppl_ratio": 1.01}}))  # fmt: skip
    summary = run_recipe(recipe)
    assert summary["ok"]
    folder = recipe.output_dir() / "tensorrt-fp16"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "not_run" and "no_cuda_device" in manifest["reason"]
    assert manifest["steps"] == {"build": "built", "validate": "ok", "engine": "not_run"}
    assert manifest["smoke"]["engine"]["build"]["reason"] == "no_cuda_device"
    assert manifest["quality"]["ppl_ratio"] == pytest.approx(1.0, abs=2e-3)  # the checkpoint itself was validated
    assert not (folder / "engine").exists() and not list(folder.rglob("*.engine"))
    assert {f["path"] for f in manifest["files"]} >= {"config.json", "rank0.safetensors"}


def test_probe_names_what_is_missing(monkeypatch):
    import sys

    from pipeline.formats import tensorrt_engine

    options = trt.Options()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tensorrt_engine.probe(options)[0] == "no_cuda_device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    code, detail = tensorrt_engine.probe(options)
    assert code == "tensorrt_llm_not_installed" and "pypi.nvidia.com" in detail
    fake = type(sys)("tensorrt_llm")
    fake.__version__ = "1.4.0"
    monkeypatch.setitem(sys.modules, "tensorrt_llm", fake)
    assert tensorrt_engine.probe(options) == ("tensorrt_llm_version_mismatch", "installed 1.4.0, recipe pins 1.2")
    fake.__version__ = "1.2.1"
    assert tensorrt_engine.probe(options) == "tensorrt_llm"  # the builder to use
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (6, 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla P4")
    assert tensorrt_engine.probe(options)[0] == "compute_capability_unsupported"


def test_w4a16_gptq_is_redone_when_its_gptq_artifact_is(tiny_llama, tmp_path):
    from pipeline.plan import make_plan
    from pipeline.recipe import load_recipe
    from pipeline.source import inspect_checkpoint
    from tests.conftest import write_recipe

    def inputs(group_size, only=None):
        recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("gptq", "int4"), ("tensorrt", "w4a16_gptq")]))
        targets = [recipe.targets[0].model_copy(update={"options": {"group_size": group_size}}), recipe.targets[1]]
        recipe = recipe.model_copy(update={"targets": targets}).select(only)
        return make_plan(recipe).inputs(inspect_checkpoint(tiny_llama), "tensorrt/w4a16_gptq")

    assert inputs(32) == inputs(32) and inputs(32) != inputs(64)
    assert inputs(32, only=["tensorrt/w4a16_gptq"]) == inputs(32)  # --only keeps what it is made from
