"""MLX conversion through mlx-lm, checked with MLX itself on this machine's backend (the CPU one here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.formats.base import Format
from pipeline.recipe import RecipeTarget as Target
from pipeline.runtimes.mlx import MlxRuntime, backend
from pipeline.source import inspect_checkpoint, load_tokenizer
from pipeline.types import FormatError
from tests.conftest import build_artifact, make_tiny_model

mx = pytest.importorskip("mlx.core", reason="MLX is an optional extra: pip install 'weightsmith[mlx]'")

TEXT = "Alice was beginning to get very tired of sitting by her sister on the bank."


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory, smollm2_dir):
    # qwen2 with a rope theta unlike mlx-lm's qwen2 default (1e6): a config that loses it gives wrong logits
    odd_rope = make_tiny_model(tmp_path_factory.mktemp("qwen2-rope"), "qwen2", smollm2_dir, rope_theta=2500.0)
    llama = make_tiny_model(tmp_path_factory.mktemp("llama-rope"), "llama", smollm2_dir, rope_theta=2500.0)
    return {
        "llama": llama,
        "qwen2": odd_rope,
        "qwen3": tiny_model("qwen3"),
        "olmo2": tiny_model("olmo2"),
        "granite": tiny_model("granite"),
        "qwen3_moe": tiny_model("qwen3_moe"),
        "mixtral": tiny_model("mixtral"),
        "smollm3": tiny_model("smollm3"),
    }


def convert(source_dir, tmp_path, quant, **options):
    out = tmp_path / f"mlx-{quant}"
    out.mkdir()
    return out, build_artifact(source_dir, ("mlx", quant, options), out)[2]


@pytest.mark.parametrize("model", ["llama", "qwen2", "qwen3", "olmo2", "granite", "smollm3", "qwen3_moe", "mixtral"])
def test_unquantized_logits_match_transformers(models, tmp_path, model):
    from transformers import AutoModelForCausalLM

    folder, info = convert(models[model], tmp_path, "f32")
    assert info["quantization"] is None and info["dtype"] == "float32"
    ids = load_tokenizer(models[model])(TEXT).input_ids
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(models[model], dtype=torch.float32)(torch.tensor([ids])).logits[0]
    runtime = MlxRuntime(folder)
    got = runtime.logits(ids)
    np.testing.assert_allclose(got, want.numpy(), atol=2e-3 * float(want.abs().max()), rtol=0)
    assert (got.argmax(-1) == want.numpy().argmax(-1)).all()
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["rope_theta"] == json.loads((models[model] / "config.json").read_text())["rope_parameters"]["rope_theta"]
    )


@pytest.mark.parametrize("quant,bits,group_size", [("q4", 4, 64), ("q8", 8, 32), ("q4", 4, 32)])
def test_quantized_weights_dequantize_within_the_affine_bound(models, tmp_path, quant, bits, group_size):
    from safetensors.torch import load_file

    folder, info = convert(models["llama"], tmp_path, quant, group_size=group_size)
    assert info["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == group_size
    weights = mx.load(str(folder / "model.safetensors"))
    source = load_file(models["llama"] / "model.safetensors")
    checked = 0
    for name, original in source.items():
        stem = name.removesuffix(".weight")
        if f"{stem}.scales" not in weights:
            assert original.ndim == 1, f"{name} was left unquantized"
            continue
        scales, biases = weights[f"{stem}.scales"], weights[f"{stem}.biases"]
        restored = mx.dequantize(weights[name], scales, biases, group_size=group_size, bits=bits)
        error = np.abs(np.array(restored.astype(mx.float32)) - original.float().numpy())
        # MLX fits each group's scale so that its larger edge is exact: values round to the nearest step, and the
        # far edge may clip by up to one step. Bound: one step; typical error: about a quarter step.
        step = np.repeat(np.abs(np.array(scales.astype(mx.float32))), group_size, axis=-1)
        assert (error <= step * 1.001 + 1e-7).all(), f"{name}: {(error / step).max()} steps"
        assert 0.15 < (error / step).mean() < 0.35, name
        checked += 1
    assert checked == 16  # 7 matrices per layer, embeddings, lm_head


def test_mixed_recipe_gives_more_bits_to_sensitive_layers(models, tmp_path):
    folder, _ = convert(models["llama"], tmp_path, "mixed_3_6")
    config = json.loads((folder / "config.json").read_text())
    per_layer = {k: v["bits"] for k, v in config["quantization"].items() if isinstance(v, dict)}
    assert per_layer["model.layers.1.self_attn.v_proj"] == 6  # the last eighth of the layers gets more bits
    assert per_layer["model.layers.0.self_attn.v_proj"] == 3 and per_layer["model.layers.1.self_attn.q_proj"] == 3
    assert per_layer["lm_head"] == 6


def smoke(source_dir, folder):
    from pipeline.reference import reference
    from pipeline.types import Validation

    validation = Validation(eval_tokens=256, context=128, max_new_tokens=6, prompts=["Hello there."])
    fmt = Format.for_target(Target(format="mlx", quant="q8"))
    return fmt.validate(folder, reference(inspect_checkpoint(source_dir), validation), validation)


def test_smoke_reports_backend_and_compute_dtype(models, tmp_path):
    folder, _ = convert(models["llama"], tmp_path, "q8")
    result = smoke(models["llama"], folder)
    runtime = result["smoke"]["runtime"]
    assert runtime["backend"] == backend() and runtime["runtime"].startswith("mlx-lm")
    assert runtime["compute_dtype"] == ("float32" if runtime["backend"] == "cpu" else "stored dtype")
    assert result["failures"] == [] and result["smoke"]["tokenizer"]["matches"]
    assert 0.95 < result["quality"]["ppl_ratio"] < 1.05 and result["quality"]["top1_agreement"] > 0.8


def test_smoke_catches_a_tokenizer_mlx_lm_would_swap(models, tmp_path):
    """transformers 5's AutoTokenizer (which mlx-lm uses) gives a qwen2 config Qwen2's pre-tokenizer whatever
    tokenizer.json says: an artifact pairing qwen2 with another tokenizer tokenizes differently in mlx-lm."""
    from pipeline.types import Budget
    from pipeline.validate import judge

    folder, _ = convert(models["qwen2"], tmp_path, "q8")
    result = smoke(models["qwen2"], folder)
    tokenizer = result["smoke"]["tokenizer"]
    assert result["failures"] == [] and not tokenizer["matches"]
    assert judge(result["quality"], None, tokenizer) == [
        f"tokenizer differs from the source's at token {tokenizer['first_mismatch']} "
        "(a budget with exact_tokenizer: false accepts it)"
    ]
    assert judge(result["quality"], Budget(exact_tokenizer=False), tokenizer) == []


def test_unsupported_architecture_and_contradicting_dtype(models, tmp_path):
    source = inspect_checkpoint(models["llama"])
    with pytest.raises(FormatError, match=r"group size 128 does not divide the input size 64 of .*; group sizes "
                                          r"that fit every quantized tensor: 32, 64"):  # fmt: skip
        Format.for_target(Target(format="mlx", quant="q4", options={"group_size": 128})).check(source)
    with pytest.raises(ValidationError, match="stores float16: dtype bfloat16 contradicts it"):
        Target(format="mlx", quant="f16", options={"dtype": "bfloat16"})
    source = source.model_copy(update={"model_type": "gpt_neox"})
    with pytest.raises(FormatError, match="MLX does not support architecture 'gpt_neox'"):
        Format.for_target(Target(format="mlx", quant="q4")).check(source)
