"""The GGUF quant ladder through llama.cpp's own quantizer, importance matrices, and split output.

The tiny model here has hidden and intermediate sizes that are multiples of 256, so the K-quants apply instead of
falling back to legacy types.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from pipeline.formats import gguf as gguf_format
from pipeline.quantizers import imatrix as gguf_imatrix
from pipeline.runtimes.llama_cpp import LlamaCppRuntime
from pipeline.source import inspect_checkpoint, load_tokenizer
from pipeline.types import Calibration
from tests.conftest import build_artifact, kl_divergence
from tests.test_gguf import ggml_quantize

CALIBRATION = Calibration(samples=8, seq_len=128)
_BUILT: dict = {}


@pytest.fixture(scope="module")
def source(tiny_model):
    return inspect_checkpoint(tiny_model("llama-256"))


@pytest.fixture(scope="module")
def build(source, tmp_path_factory):
    def _build(quant: str, **options):
        key = (quant, tuple(sorted(options.items())))
        if key not in _BUILT:
            out = tmp_path_factory.mktemp(quant)
            _, _, info = build_artifact(source.path, ("gguf", quant, options), out, calibration=CALIBRATION)
            _BUILT[key] = (out, info)
        return _BUILT[key]

    return _build


def compute_imatrix(source):
    from pipeline.formats.gguf_arch import architecture, tensor_name

    arch = architecture(source.model_type, source.config())
    return gguf_imatrix.compute(source, CALIBRATION, lambda name: tensor_name(arch, name))


@pytest.fixture(scope="module")
def text_ids(source):
    tokenizer = load_tokenizer(source.path)
    return tokenizer(
        "Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
        "nothing to do: once or twice she had peeped into the book her sister was reading."
    ).input_ids


def logits(folder, ids) -> np.ndarray:
    runtime = LlamaCppRuntime(gguf_format.model_files(folder)[0], n_ctx=128)
    try:
        return runtime.logits(ids)
    finally:
        runtime.close()


LADDER = {  # quant -> the tensor type that must carry most weight matrices
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q2_k": "Q2_K", "q3_k_m": "Q3_K",
    "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "iq4_xs": "IQ4_XS",
}  # fmt: skip


@pytest.mark.parametrize("quant", LADDER)
def test_ladder_builds_with_llama_cpp_types_and_runs(build, quant, text_ids):
    folder, info = build(quant)
    assert info["route"] == "llama.cpp" and info["base"] == "f16"  # the tiny checkpoint is float32
    types = info["tensor_types"]
    assert types[LADDER[quant]] == max(v for k, v in types.items() if k != "F32"), types
    assert not (folder / ".base").exists() and [p.name for p in folder.iterdir()] == [f"tiny-{quant.upper()}.gguf"]
    reader = gguf.GGUFReader(folder / info["file"])
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"])
    f16 = logits(build("f16")[0], text_ids)
    got = logits(folder, text_ids)
    cosine = (got * f16).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(f16, axis=-1)
    assert np.isfinite(got).all() and cosine.mean() > 0.6  # random weights: even Q2_K keeps the logits' direction


def test_more_bits_stay_closer_to_the_source(build, text_ids):
    f16 = logits(build("f16")[0], text_ids)
    kl = {q: kl_divergence(f16, logits(build(q)[0], text_ids)) for q in ("q2_k", "q4_k_m", "q6_k")}
    assert kl["q6_k"] < kl["q4_k_m"] < kl["q2_k"], kl
    assert kl["q6_k"] < 0.01


def test_output_is_what_llama_quantize_makes_from_the_same_base(build, tmp_path):
    folder, info = build("q4_k_m")
    direct = ggml_quantize(gguf_format.model_files(build("f16")[0])[0], tmp_path / "q.gguf",
                           gguf.LlamaFileType.MOSTLY_Q4_K_M)  # fmt: skip
    ours = {t.name: t for t in gguf.GGUFReader(folder / info["file"]).tensors}
    for theirs in gguf.GGUFReader(direct).tensors:
        assert ours[theirs.name].tensor_type == theirs.tensor_type, theirs.name
        assert bytes(ours[theirs.name].data) == bytes(theirs.data), theirs.name


def test_imatrix_is_the_mean_square_of_each_linear_input(source):
    from transformers import AutoModelForCausalLM

    from pipeline.corpus import calibration_samples, load_text

    imatrix = compute_imatrix(source)
    assert len(imatrix.sums) == 2 * 7 and "output.weight" not in imatrix.sums  # 7 matrices per layer, no output
    samples = calibration_samples(load_tokenizer(source.path), load_text("builtin:corpus", "calibration"), 8, 128, 0)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    with torch.inference_mode():  # attn_q's input in layer 0 is the normed embedding; ffn_down's is act(gate) * up
        hidden = torch.cat([model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(s)))
                            for s in samples])  # fmt: skip
    expected = (hidden.double() ** 2).sum(0).numpy()
    np.testing.assert_allclose(imatrix.sums["blk.0.attn_q.weight"], expected, rtol=1e-4)
    assert imatrix.counts["blk.0.attn_q.weight"] == 8 * 128 and imatrix.chunks == 8 and imatrix.chunk_size == 128


def test_imatrix_file_round_trips_in_llama_cpp_layout(build, source):
    folder, info = build("q4_k_m", imatrix=True)
    assert info["imatrix"]["tensors"] == 14 and len(info["imatrix"]["calibration_sha256"]) == 64
    reader = gguf.GGUFReader(folder / "imatrix.gguf")
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts", "blk.1.ffn_down.weight.in_sum2"} <= names
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.chunk_count").contents() == 8
    assert reader.get_field("imatrix.chunk_size").contents() == 128
    again, computed = gguf_imatrix.read(folder / "imatrix.gguf"), compute_imatrix(source)
    assert again.counts == computed.counts
    for name, sums in computed.sums.items():
        np.testing.assert_array_equal(again.sums[name], sums)


def test_llama_cpp_quantizer_uses_the_imatrix(build, source):
    """With the importance matrix, the quantizer trades error in unimportant columns for error in important ones:
    the importance-weighted error of the quantized weights goes down."""
    plain = {t.name: t for t in gguf.GGUFReader(gguf_format.model_files(build("q4_k_m")[0])[0]).tensors}
    folder, _ = build("q4_k_m", imatrix=True)
    weighted = {t.name: t for t in gguf.GGUFReader(gguf_format.model_files(folder)[0]).tensors}
    exact = {t.name: np.array(t.data) for t in gguf.GGUFReader(gguf_format.model_files(build("f32")[0])[0]).tensors}
    means = gguf_imatrix.read(folder / "imatrix.gguf").means()
    better = 0
    for name, importance in means.items():
        assert plain[name].tensor_type == weighted[name].tensor_type
        errors = []
        for tensor in (plain[name], weighted[name]):
            restored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(exact[name].shape)
            errors.append(float((((restored - exact[name]) ** 2) * importance).sum()))
        better += errors[1] < errors[0]
        assert errors[1] != errors[0], name
    assert better >= 0.8 * len(means), f"{better}/{len(means)} tensors improved"


def test_split_output_loads_as_one_model(build, text_ids):
    whole = logits(build("f16")[0], text_ids)
    for quant in ("f16", "q4_k_m"):
        folder, info = build(quant, split_max_size="8M")
        files = gguf_format.model_files(folder)
        assert info["shards"] == len(files) >= 2
        assert [f.name for f in files] == [f"tiny-{quant.upper()}-{i:05d}-of-{len(files):05d}.gguf"
                                           for i in range(1, len(files) + 1)]  # fmt: skip
        for f in files:  # a shard stays under the limit (plus the metadata) unless one tensor alone is larger
            tensors = gguf.GGUFReader(f).tensors
            assert len(tensors) == 1 or sum(int(t.n_bytes) for t in tensors) <= 8_000_000, f.name
        got = logits(folder, text_ids)
        if quant == "f16":
            np.testing.assert_array_equal(got, whole)
        else:
            np.testing.assert_array_equal(got, logits(build(quant)[0], text_ids))


def test_bf16_checkpoint_is_quantized_from_a_bf16_base(smollm2_dir):
    source = inspect_checkpoint(smollm2_dir)
    assert gguf_format.base_quant(source, gguf_format.Options()) == "bf16"
    assert gguf_format.base_quant(source, gguf_format.Options(base="f16")) == "f16"
    assert json.loads((smollm2_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
