"""GGUF export on tiny random Llama and Qwen2 checkpoints: what llama.cpp reads back is what the source holds."""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.formats.base import Format
from pipeline.formats.gguf_arch import permute_qk
from pipeline.reference import TOKENIZER_PROBE_SUFFIX
from pipeline.runtimes.llama_cpp import LlamaCppRuntime
from pipeline.source import inspect_checkpoint, load_tokenizer
from pipeline.types import Calibration, FormatError, Target
from tests.conftest import build_artifact

_BUILT: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def models(tiny_model, tiny_llama_spm):
    """models[name] -> a tiny checkpoint folder (conftest.TINY_MODELS, or the SentencePiece llama)."""

    class Models(dict):
        def __missing__(self, name):
            self[name] = tiny_llama_spm if name == "llama-spm" else tiny_model(name)
            return self[name]

    return Models()


@pytest.fixture(scope="module")
def build(models, tmp_path_factory):
    def _build(model: str, quant: str, **options) -> Path:
        key = (model, quant, tuple(sorted(options.items())))
        if key not in _BUILT:
            out = tmp_path_factory.mktemp(f"{model}-{quant}")
            _, _, info = build_artifact(models[model], ("gguf", quant, options), out,
                                        calibration=Calibration(samples=8, seq_len=128))  # fmt: skip
            _BUILT[key] = out / info["file"]
        return _BUILT[key]

    return _build


def expected_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """The source tensors under their llama.cpp names, in float32, as llama.cpp expects them (q/k permuted for
    `llama`, norms shifted for Gemma)."""
    from pipeline.formats.gguf_arch import architecture, tensor_name

    config = json.loads((model_dir / "config.json").read_text())
    arch = architecture(config["model_type"], config)
    out = {}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        gguf_name = tensor_name(arch, name)
        if gguf_name is None:
            continue
        data = tensor.float().numpy()
        if gguf_name.endswith("norm.weight"):
            data = data + arch.norm_offset  # Gemma stores RMSNorm weights as an offset from 1
        if arch.permute_qk and ".attn_q." in gguf_name:
            data = permute_qk(data, config["num_attention_heads"])
        if arch.permute_qk and ".attn_k." in gguf_name:
            data = permute_qk(data, config["num_key_value_heads"])
        out[gguf_name] = data
    return out


def read_tensors(path: Path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


@pytest.mark.parametrize("model", ["llama", "qwen2", "gemma2", "phi3"])
@pytest.mark.parametrize("quant,dtype", [("f32", np.float32), ("f16", np.float16)])
def test_float_types_read_back_exactly(build, models, model, quant, dtype):
    written = read_tensors(build(model, quant))
    expected = expected_tensors(models[model])
    assert set(written) == set(expected)
    for name, (qtype, data) in written.items():
        want = expected[name] if qtype == gguf.GGMLQuantizationType.F32 else expected[name].astype(dtype)
        np.testing.assert_array_equal(data.reshape(want.shape), want.astype(np.float32), err_msg=name)
        if expected[name].ndim == 2:
            assert qtype.name == quant.upper(), name


def test_bf16_reads_back_as_torch_rounds_it(build, models):
    written = read_tensors(build("llama", "bf16"))
    for name, want in expected_tensors(models["llama"]).items():
        qtype, data = written[name]
        if want.ndim == 2:
            assert qtype == gguf.GGMLQuantizationType.BF16
            want = torch.from_numpy(want).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(data.reshape(want.shape), want, err_msg=name)


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_q8_0_within_quantization_bound(build, models, model):
    written = read_tensors(build(model, "q8_0"))
    for name, want in expected_tensors(models[model]).items():
        qtype, data = written[name]
        if want.ndim < 2:
            assert qtype == gguf.GGMLQuantizationType.F32
            continue
        assert qtype == gguf.GGMLQuantizationType.Q8_0, name
        blocks = want.reshape(-1, 32)
        scale = np.abs(blocks).max(axis=1, keepdims=True) / 127  # Q8_0: 32 values share one fp16 scale
        error = np.abs(data.reshape(-1, 32) - blocks)
        assert (error <= 0.57 * scale + 1e-12).all(), f"{name}: max error {error.max()} over bound"
        assert error.max() > 0  # it really was quantized


def ggml_quantize(source: Path, out: Path, ftype: gguf.LlamaFileType, pure: bool = False) -> Path:
    """llama.cpp's own quantizer run directly on a file, as llama-quantize runs it."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = int(ftype), pure, 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_py_quantizers_equal_ggml_c(build, tmp_path, qtype):
    """gguf-py's numpy quantizers give the bytes of ggml's C quantizer on the same float32 tensors."""
    reference = ggml_quantize(build("llama", "f32"), tmp_path / "c.gguf", gguf.LlamaFileType[f"MOSTLY_{qtype}"], True)
    source = {t.name: np.array(t.data) for t in gguf.GGUFReader(build("llama", "f32")).tensors}
    compared = 0
    for theirs in gguf.GGUFReader(reference).tensors:
        if theirs.tensor_type.name == qtype:
            ours = gguf.quants.quantize(source[theirs.name], theirs.tensor_type)
            assert ours.tobytes() == bytes(theirs.data), theirs.name
            compared += 1
    assert compared == 16  # every matrix of the tiny llama: 7 per layer, the embeddings and the output


def test_q8_0_artifact_equals_ggml_c_quantizer(build, tmp_path):
    reference = ggml_quantize(build("llama", "f32"), tmp_path / "c.gguf", gguf.LlamaFileType.MOSTLY_Q8_0, True)
    ours = {t.name: t for t in gguf.GGUFReader(build("llama", "q8_0")).tensors}
    for theirs in gguf.GGUFReader(reference).tensors:
        assert ours[theirs.name].tensor_type == theirs.tensor_type, theirs.name
        assert bytes(ours[theirs.name].data) == bytes(theirs.data), theirs.name


REQUIRED_KEYS = [
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
    "{arch}.context_length",
    "{arch}.embedding_length",
    "{arch}.block_count",
    "{arch}.feed_forward_length",
    "{arch}.attention.head_count",
    "{arch}.attention.head_count_kv",
    "{arch}.attention.layer_norm_rms_epsilon",
    "{arch}.rope.freq_base",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token",
]


@pytest.mark.parametrize(
    "model,arch",
    [("llama", "llama"), ("qwen2", "qwen2"), ("llama-spm", "llama"), ("qwen3", "qwen3"), ("mistral", "llama"),
     ("gemma2", "gemma2"), ("phi3", "phi3")],
)  # fmt: skip
def test_metadata_llama_cpp_needs(build, models, model, arch):
    reader = gguf.GGUFReader(build(model, "f16"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    for key in REQUIRED_KEYS:
        assert key.format(arch=arch) in fields, key
    config = json.loads((models[model] / "config.json").read_text())
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert fields[f"{arch}.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    if model == "gemma2":
        assert fields["gemma2.final_logit_softcapping"] == 30.0 and fields["gemma2.attention.sliding_window"] == 512
    if "head_dim" in config:
        assert fields[f"{arch}.attention.key_length"] == config["head_dim"]
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    if model == "llama-spm":
        assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.scores" in fields
    else:
        assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
        assert len(fields["tokenizer.ggml.merges"]) > 40000
        assert fields["tokenizer.chat_template"] == (models[model] / "chat_template.jinja").read_text()


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    runtime = LlamaCppRuntime(path, n_ctx=256)
    try:
        return runtime.logits(ids)
    finally:
        runtime.close()


@pytest.mark.parametrize("model", ["llama", "qwen2", "llama-spm", "qwen3", "mistral", "gemma2", "phi3", "llama3-rope",
                                   "olmo2", "granite", "smollm3", "qwen3_moe", "mixtral"])  # fmt: skip
def test_llama_cpp_logits_match_transformers(build, models, model):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(models[model])
    ids = tokenizer("Alice was beginning to get very tired of sitting by her sister on the bank.").input_ids[:48]
    hf = AutoModelForCausalLM.from_pretrained(models[model], dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(build(model, "f32"), ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max(), np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("model", ["llama", "llama-spm"])
def test_gguf_tokenizer_gives_hf_ids(build, models, model):
    from pipeline.corpus import load_text

    text = load_text("builtin:corpus", "held_out")[:3000] + TOKENIZER_PROBE_SUFFIX
    runtime = LlamaCppRuntime(build(model, "f16"), n_ctx=64)
    try:
        got = runtime.tokenize(text)
    finally:
        runtime.close()
    want = load_tokenizer(models[model])(text).input_ids
    assert len(want) > 500
    assert got == want


def test_unknown_architecture_fails_before_writing(models, tmp_path):
    folder = tmp_path / "gptneox"
    shutil.copytree(models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    supported = (
        "deepseek_v3, gemma2, gemma3_text, gemma4_text, gpt_oss, granite, llama, llama4_text, mistral, mixtral, "
        "olmo2, phi3, qwen2, qwen3, qwen3_5, qwen3_5_moe, qwen3_5_moe_text, qwen3_5_text, qwen3_moe, qwen3_next, "
        "smollm3"
    )
    with pytest.raises(FormatError, match=rf"does not support architecture 'gpt_neox'.*\(supported: {supported}\)"):
        Format.for_target(Target(format="gguf", quant="f16")).check(inspect_checkpoint(folder))


def test_unknown_pre_tokenizer_is_an_error_with_its_hash(models, tmp_path):
    folder = tmp_path / "odd-tokenizer"
    shutil.copytree(models["llama"], folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(FormatError, match=r"unknown BPE pre-tokenizer \(probe hash [0-9a-f]{64}\)"):
        Format.for_target(Target(format="gguf", quant="f16")).check(inspect_checkpoint(folder))


def test_a_moe_config_llama_cpp_would_compute_differently_is_refused(tiny_model, tmp_path):
    """llama.cpp's qwen3moe renormalises the chosen experts' weights: a checkpoint that does not (measured: logits off
    by 14% of their range) is refused before anything is written."""
    from tests.conftest import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", "qwen3_moe", tiny_model("qwen3_moe"), norm_topk_prob=False)
    with pytest.raises(FormatError, match=r"llama\.cpp's qwen3moe assumes norm_topk_prob: True, this checkpoint has "
                                          r"False"):  # fmt: skip
        Format.for_target(Target(format="gguf", quant="f16")).check(inspect_checkpoint(folder))


def test_moe_experts_are_merged_as_llama_cpp_keeps_them(build, models):
    reader = gguf.GGUFReader(build("qwen3_moe", "f16"))
    fields = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("qwen3moe.expert")}
    assert fields == {"qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2,
                      "qwen3moe.expert_feed_forward_length": 64}  # fmt: skip
    tensors = {t.name: t for t in reader.tensors}
    source = load_file(models["qwen3_moe"] / "model.safetensors")
    for part, gguf_part in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
        stacked = torch.stack([source[f"model.layers.1.mlp.experts.{e}.{part}.weight"] for e in range(4)])
        got = tensors[f"blk.1.{gguf_part}.weight"]
        assert tuple(reversed(got.shape.tolist())) == tuple(stacked.shape)
        np.testing.assert_array_equal(np.array(got.data).reshape(stacked.shape), stacked.half().numpy())
    assert "blk.1.ffn_gate_inp.weight" in tensors  # the router, unquantized


def test_general_name_is_the_models_never_the_recipes(models, tmp_path):
    """llama.cpp applies family vocabulary rules by `general.name` (a recipe named "...phi3..." over another
    tokenizer once made an unloadable file): it is the model's own name."""
    from tests.conftest import build_artifact

    _, source, info = build_artifact(models["llama"], ("gguf", "f16"), tmp_path, name="my-phi3-build")
    reader = gguf.GGUFReader(tmp_path / info["file"])
    assert info["file"] == "my-phi3-build-F16.gguf"
    assert reader.get_field("general.name").contents() == source.name == models["llama"].name
