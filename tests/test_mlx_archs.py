"""MLX conversion of the 2026 families (hybrid linear attention, per-layer embeddings, attention sinks, latent
attention, fused experts), checked in mlx-lm on the CPU backend against transformers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from pipeline.archs import ARCHS, MlxTensors
from pipeline.runtimes.mlx import MlxRuntime
from pipeline.source import load_tokenizer
from pipeline.types import FormatError
from tests.conftest import build_artifact

mx = pytest.importorskip("mlx.core", reason="MLX is an optional extra: pip install 'weightsmith[mlx]'")

TEXT = "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do."
ARCHS_2026 = ["qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "gemma3_text", "gemma4_text", "gpt_oss", "deepseek_v3",
              "llama4_text", "qwen3_5", "qwen3_5_moe", "gemma4_text-moe"]  # fmt: skip
EXPERTS = {"qwen3_5_moe_text", "qwen3_5_moe", "gemma4_text-moe", "qwen3_next", "gpt_oss", "deepseek_v3", "llama4_text"}


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory):
    """converted(arch, quant) -> the MLX folder of that tiny checkpoint, built once per module."""
    made = {}

    def get(name: str, quant: str):
        if (name, quant) not in made:
            out = tmp_path_factory.mktemp(f"mlx-{name}-{quant}")
            build_artifact(tiny_model(name), ("mlx", quant), out)
            made[name, quant] = out
        return made[name, quant]

    return get


def transformers_logits(source, ids, dtype):
    """transformers' logits in float32 from the checkpoint's weights rounded to `dtype` (as the artifact stores
    them), so that the comparison measures the conversion, not the rounding."""
    from transformers import AutoModelForCausalLM

    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).float()
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("quant", ["f32", "f16"])
@pytest.mark.parametrize("name", ARCHS_2026)
def test_unquantized_logits_match_transformers(tiny_model, converted, name, quant):
    assert ARCHS[name.removesuffix("-moe")].mlx
    source = tiny_model(name)
    ids = load_tokenizer(source)(TEXT).input_ids
    want = transformers_logits(source, ids, {"f32": torch.float32, "f16": torch.float16}[quant])
    runtime = MlxRuntime(converted(name, quant))
    try:
        got = runtime.logits(ids)
    finally:
        runtime.close()
    print(f"{name} {quant}: max |dlogit| {np.abs(got - want).max():.2e} (max |logit| {np.abs(want).max():.1f})")
    # float16: mlx-lm's sanitize of some modules folds a constant into stored weights (Qwen 3.5's norms are stored as
    # 1 + w), rounded to float16 after the fold where transformers rounds before it
    tolerance = {"f32": 1e-4, "f16": 2e-2}[quant]
    np.testing.assert_allclose(got, want, atol=tolerance * float(np.abs(want).max()), rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= (1.0 if quant == "f32" else 0.9)


@pytest.mark.parametrize("name", ARCHS_2026)
def test_q4_quantizes_every_matrix_experts_included(converted, name):
    """Each q4 tensor dequantizes to within one quantization step of the float conversion's tensor of the same name
    (experts as mlx-lm's switch layers, [experts, out, in]), and the folder runs in mlx-lm."""
    floats = {k: v for f in converted(name, "f32").glob("*.safetensors") for k, v in mx.load(str(f)).items()}
    folder = converted(name, "q4")
    quants = {k: v for f in folder.glob("*.safetensors") for k, v in mx.load(str(f)).items()}
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    per_module = {k: v for k, v in config["quantization"].items() if isinstance(v, dict)}  # mlx-lm's 8-bit routers
    for stem in [k.removesuffix(".scales") for k in quants if k.endswith(".scales")]:
        bits = per_module.get(stem, {}).get("bits", 4)
        scales, biases = quants[f"{stem}.scales"], quants[f"{stem}.biases"]
        restored = mx.dequantize(quants[f"{stem}.weight"], scales, biases, group_size=64, bits=bits)
        original = np.array(floats[f"{stem}.weight"].astype(mx.float32))
        step = np.repeat(np.abs(np.array(scales.astype(mx.float32))), 64, axis=-1)
        error = np.abs(np.array(restored.astype(mx.float32)) - original)
        assert (error <= step * 1.001 + 1e-6).all(), stem
    expert_weights = [k for k in floats if re.search(r"\.(switch_mlp|switch_glu|experts)\.\w+\.weight$", k)]
    assert all(f"{k.removesuffix('.weight')}.scales" in quants for k in expert_weights)
    assert all(floats[k].ndim == 3 for k in expert_weights) and bool(expert_weights) == (name in EXPERTS)
    runtime = MlxRuntime(folder)
    try:
        assert np.isfinite(runtime.logits(list(range(1, 20)))).all()
    finally:
        runtime.close()


def test_rewrite_rules():
    """The rewrites that give mlx-lm its expert layout: stacking per-expert linears, splitting fused ones."""
    from pipeline.formats.mlx import rewrite

    row = ARCHS["gpt_oss"]
    fused = mx.arange(2 * 3 * 4).reshape(2, 3, 4)  # [experts, in, 2·out], gate and up interleaved
    out = rewrite({"m.experts.gate_up_proj": fused, "m.norm.weight": mx.ones(3)}, row.mlx_tensors, "lm.")
    assert sorted(out) == ["lm.m.experts.gate_proj.weight", "lm.m.experts.up_proj.weight", "lm.m.norm.weight"]
    assert np.array_equal(np.array(out["lm.m.experts.gate_proj.weight"]), np.array(fused)[..., ::2].swapaxes(1, 2))
    assert np.array_equal(np.array(out["lm.m.experts.up_proj.weight"]), np.array(fused)[..., 1::2].swapaxes(1, 2))

    stack = ARCHS["qwen3_5_moe_text"].mlx_tensors
    experts = {f"l.mlp.experts.{e}.down_proj.weight": mx.full((2, 2), e) for e in (1, 0, 2)}
    out = rewrite(experts, stack)
    assert list(out) == ["l.mlp.switch_mlp.down_proj.weight"]
    assert np.array(out["l.mlp.switch_mlp.down_proj.weight"])[:, 0, 0].tolist() == [0, 1, 2]
    with pytest.raises(FormatError, match="not numbered 0..1"):
        rewrite({k: v for k, v in experts.items() if ".0." not in k}, stack)
    with pytest.raises(FormatError, match="names 1 pieces for 2"):
        rewrite({"x.w": mx.ones((2, 2))}, (MlxTensors(r"^(x)\.w$", (r"\1.a",), "halves"),))


def test_config_mlx_lm_would_compute_differently_is_refused(tiny_model, tmp_path):
    """mlx-lm's llama4 hard-codes top-1 routing and no rope on every 4th layer: another config is refused up front."""
    import shutil

    from pipeline.formats.base import Format
    from pipeline.recipe import RecipeTarget as Target
    from pipeline.source import inspect_checkpoint

    shutil.copytree(tiny_model("llama4_text"), tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 2}))
    with pytest.raises(FormatError, match="MLX: mlx-lm's llama4 assumes num_experts_per_tok: 1, this checkpoint has 2"):
        Format.for_target(Target(format="mlx", quant="q4")).check(inspect_checkpoint(tmp_path))


@pytest.mark.parametrize("name", ["llama4_text", "qwen3_next"])
def test_validation_generates_with_mlx_lm_caches(tiny_model, converted, name):
    """The validation step on a q8 folder: perplexity and generation through mlx-lm's own caches (chunked attention,
    linear-attention state), beyond one forward pass; Llama 4's folder holds a multimodal config."""
    from pipeline.formats.base import Format
    from pipeline.recipe import RecipeTarget as Target
    from pipeline.reference import reference
    from pipeline.source import inspect_checkpoint
    from pipeline.types import Validation

    validation = Validation(eval_tokens=256, context=128, max_new_tokens=6, prompts=["Hello there."])
    fmt = Format.for_target(Target(format="mlx", quant="q8"))
    result = fmt.validate(
        converted(name, "q8"), reference(inspect_checkpoint(tiny_model(name)), validation), validation
    )
    assert result["failures"] == [] and result["smoke"]["tokenizer"]["matches"]
    assert 0.97 < result["quality"]["ppl_ratio"] < 1.03 and result["quality"]["top1_agreement"] > 0.85
