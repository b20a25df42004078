"""ONNX: the standard export's graph interface and KV cache, and the onnxruntime-genai flavour, run in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.recipe import RecipeTarget as Target
from pipeline.source import load_tokenizer
from pipeline.types import Step, Validation

onnx = pytest.importorskip("onnx", reason="ONNX is an optional extra: pip install 'weightsmith[onnx]'")
from pipeline.formats.base import Format  # noqa: E402
from pipeline.runtimes.onnxruntime import OnnxRuntime  # noqa: E402
from tests.conftest import build_artifact  # noqa: E402

TEXT = "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do."
_BUILT: dict = {}


@pytest.fixture(scope="module")
def build(tiny_model, tmp_path_factory):
    def _build(model: str, quant: str, **options):
        key = (model, quant, tuple(sorted(options.items())))
        if key not in _BUILT:
            out = tmp_path_factory.mktemp(f"onnx-{model}-{quant}")
            _, source, facts = build_artifact(tiny_model(model), ("onnx", quant, options), out)
            _BUILT[key] = (out, facts, source)
        return _BUILT[key]

    return _build


def transformers_logits(folder, ids) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    with torch.inference_mode():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_standard_graph_interface(build, model):
    folder, info, _ = build(model, "fp32")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    n = info["n_layers"]
    kv = [f"{i}.{k}" for i in range(n) for k in ("key", "value")]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids",
                                             *[f"past_key_values.{x}" for x in kv]]  # fmt: skip
    assert [o.name for o in graph.output] == ["logits", *[f"present.{x}" for x in kv]]

    def axes(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    shapes = {v.name: axes(v) for v in [*graph.input, *graph.output]}
    assert shapes["input_ids"] == ["batch", "sequence_length"]
    assert shapes["attention_mask"] == ["batch", "total_sequence_length"]
    assert shapes["past_key_values.0.key"] == ["batch", info["kv_heads"], "past_sequence_length", info["head_dim"]]
    assert shapes["logits"][:2] == ["batch", "sequence_length"]
    standard = {"", "ai.onnx"}  # no contrib ops: a plain TensorRT build can take this graph
    assert {node.domain for node in graph.node} <= standard | {"pkg.onnxscript.torch_lib.common"}


@pytest.mark.parametrize("model", ["llama", "qwen2"])  # every other row's onnx/fp32: tests/test_arch_matrix.py
def test_standard_fp32_logits_match_transformers(build, model, tiny_model):
    folder, _, _ = build(model, "fp32")
    ids = load_tokenizer(tiny_model(model))(TEXT).input_ids
    got = OnnxRuntime(folder).logits(ids)
    want = transformers_logits(tiny_model(model), ids)
    assert np.abs(got[0] - want[0]).max() < 1e-4  # the first token's logits, as the issue asks
    assert np.abs(got - want).max() < 1e-4


def full_sequence_greedy(runtime, ids, n) -> list[int]:
    """Greedy decoding without any cache: the whole sequence is evaluated again for every new token."""
    out = []
    for _ in range(n):
        out.append(int(runtime.logits(ids + out)[-1].argmax()))
    return out


# gemma3_text: sliding-window layers (window 8) beside global ones, the prompt and the cache longer than the window
@pytest.mark.parametrize("model", ["llama", "qwen2", "gemma3_text"])
def test_kv_cache_decoding_equals_full_sequence_decoding(build, model, tiny_model):
    folder, _, _ = build(model, "fp32")
    runtime = OnnxRuntime(folder)
    ids = load_tokenizer(tiny_model(model))(TEXT).input_ids
    cached = runtime.greedy(ids, 10, stop_ids=set())
    assert cached == full_sequence_greedy(runtime, ids, 10) and len(cached) == 10


def test_standard_fp16_export_keeps_the_interface_in_half_precision(build, tiny_model):
    """The graph plain TensorRT builds fp16 engines from: weights, cache and logits in float16, close to the fp32
    model, and its KV cache decoding consistent."""
    folder, info, _ = build("llama", "fp16", flavour="standard")
    fp32, _, _ = build("llama", "fp32")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    half = onnx.TensorProto.FLOAT16
    assert types["past_key_values.0.key"] == types["present.0.value"] == types["logits"] == half
    assert types["input_ids"] == onnx.TensorProto.INT64
    data = (folder / "model.onnx.data").stat().st_size
    assert 0.45 < data / (fp32 / "model.onnx.data").stat().st_size < 0.55  # the weights are stored in half
    runtime = OnnxRuntime(folder)
    ids = load_tokenizer(tiny_model("llama"))(TEXT).input_ids
    got, want = runtime.logits(ids), transformers_logits(tiny_model("llama"), ids)
    assert runtime.dtype == np.float16 and np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert runtime.greedy(ids, 8, stop_ids=set()) == full_sequence_greedy(runtime, ids, 8)


@pytest.mark.parametrize("model", ["qwen2", "granite"])  # granite: its four multipliers in the builder's graph
def test_genai_flavour_runs_in_onnxruntime_genai(build, tiny_model, model):
    import onnxruntime_genai as og

    folder, info, _ = build(model, "fp32", flavour="genai")
    assert (folder / "genai_config.json").is_file() and info["flavour"] == "genai"
    runtime = OnnxRuntime(folder)
    ids = load_tokenizer(tiny_model(model))(TEXT).input_ids
    assert np.abs(runtime.logits(ids) - transformers_logits(tiny_model(model), ids)).max() < 1e-4
    generated = runtime.greedy(ids, 8, stop_ids=set())  # onnxruntime-genai's own generator and KV cache
    assert generated == full_sequence_greedy(runtime, ids, 8)
    tokenizer = og.Tokenizer(og.Model(str(folder)))  # the folder's tokenizer loads in the genai runtime
    assert (
        list(tokenizer.encode("Alice was beginning"))
        == load_tokenizer(tiny_model(model))("Alice was beginning").input_ids
    )


def test_genai_int4_uses_matmulnbits_with_the_block_size(build, tiny_model):
    folder, info, _ = build("llama", "int4", block_size=32)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 2 * 4 and info["block_size"] == 32
    assert {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {32}
    ids = load_tokenizer(tiny_model("llama"))(TEXT).input_ids
    got, want = OnnxRuntime(folder).logits(ids), transformers_logits(tiny_model("llama"), ids)
    cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cosine.mean() > 0.75  # 4-bit weights on a random model (init 0.25): close, not equal


def test_smoke_on_standard_export(build, tiny_model):
    from pipeline.reference import reference

    folder, _, source = build("llama", "fp32")
    validation = Validation(eval_tokens=256, context=128, max_new_tokens=6, prompts=["Hello there."])
    result = Format.for_target(Target(format="onnx", quant="fp32")).validate(folder, reference(source, validation),
                                                                              validation)  # fmt: skip
    assert result["failures"] == [] and result["smoke"]["runtime"]["execution_provider"] == "CPUExecutionProvider"
    assert result["quality"]["ppl_ratio"] == pytest.approx(1.0, abs=1e-4) and result["quality"]["top1_agreement"] == 1
    case = result["smoke"]["generation"]["cases"][0]
    assert case["matching_prefix"] == case["tokens"] == 6


def test_option_errors():
    with pytest.raises(ValidationError, match="the standard ONNX export is fp32 or fp16"):
        Target(format="onnx", quant="int4", options={"flavour": "standard"})
    with pytest.raises(ValidationError, match="unknown option 'blocksize'"):
        Target(format="onnx", quant="int4", options={"blocksize": 32})


def test_missing_genai_is_reported_with_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    target = Format.for_target(Target(format="onnx", quant="int4"))
    assert target.missing_dependency(Step.BUILD) == (
        "onnxruntime_genai is not installed: pip install 'weightsmith[onnx]'"
    )
    assert Format.for_target(Target(format="onnx", quant="fp32")).missing_dependency(Step.BUILD) is None
