"""GPTQ: the solver against round-to-nearest, the v1 packing, and checkpoints that GPTQModel and transformers load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.formats import gptq as gptq_format
from pipeline.formats.base import Format
from pipeline.quantizers import gptq as G
from pipeline.runtimes.transformers import cpu_workers, open_gptq
from pipeline.source import inspect_checkpoint
from pipeline.types import Calibration, FormatError, Target, Validation
from tests.conftest import build_artifact

CALIBRATION = Calibration(samples=8, seq_len=128)
_BUILT: dict = {}


def correlated_problem(out=48, columns=128, n=1024, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, columns, generator=generator) * 0.05
    inputs = torch.randn(n, columns, generator=generator) @ (torch.randn(columns, columns, generator=generator) / 8)
    return weight, 2 * inputs.T @ inputs / n


SPECS = [G.QuantSpec(4, 32), G.QuantSpec(4, 32, sym=False), G.QuantSpec(8, 64), G.QuantSpec(8, 64, sym=False),
         G.QuantSpec(4, 32, desc_act=True), G.QuantSpec(4, 32, desc_act=True, static_groups=True),
         G.QuantSpec(8, -1, desc_act=True, sym=False)]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_packing_round_trip_equals_plain_dequantization(spec):
    weight, hessian = correlated_problem()
    quantized = G.gptq(weight, hessian, spec)
    tensors = G.to_checkpoint(quantized, spec.bits)
    columns, out = weight.shape[1], weight.shape[0]
    groups = spec.groups(columns)
    assert tensors["qweight"].shape == (columns * spec.bits // 32, out) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (groups, out * spec.bits // 32) and tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].shape == (groups, out) and tensors["scales"].dtype == torch.float16
    assert tensors["g_idx"].shape == (columns,) and tensors["g_idx"].dtype == torch.int32
    plain = torch.empty(out, columns)  # the textbook formula, element by element
    for j in range(columns):
        g = int(quantized.g_idx[j])
        plain[:, j] = quantized.scales[g].half().float() * (quantized.q[:, j].float() - quantized.zeros[g].float())
    torch.testing.assert_close(G.from_checkpoint(tensors, spec.bits), plain, rtol=0, atol=0)
    torch.testing.assert_close(quantized.dequantized, plain, rtol=0, atol=0)
    assert int(quantized.q.max()) <= spec.maxq
    if spec.sym and spec.bits == 4:
        assert (tensors["qzeros"] == 0x77777777).all()  # v1 stores zero - 1: 7 in every nibble
    if gptq_format.scattered_groups(spec):  # what the checkpoint's `desc_act` says
        assert not torch.equal(quantized.g_idx, torch.arange(columns, dtype=torch.int32) // spec.group_size)
    else:
        assert torch.equal(quantized.g_idx, torch.arange(columns, dtype=torch.int32) // spec.width(columns))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gptq_beats_round_to_nearest_on_the_layer_output(spec):
    weight, hessian = correlated_problem(seed=1)
    gptq = G.output_error(weight, G.gptq(weight, hessian, spec).dequantized, hessian)
    rtn = G.output_error(weight, G.rtn(weight, spec).dequantized, hessian)
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_pack_known_values():
    levels = torch.arange(16, dtype=torch.int32).reshape(8, 2)  # 8 rows pack into one int32 per column
    words = G.pack(levels, 4, dim=0)
    assert words.shape == (1, 2)
    assert int(words[0, 0]) & 0xFFFFFFFF == 0xECA86420 and int(words[0, 1]) & 0xFFFFFFFF == 0xFDB97531
    assert torch.equal(G.unpack(words, 4, dim=0), levels.long())


@pytest.fixture(scope="module")
def build(tiny_model, tmp_path_factory):
    def _build(quant="int4", model="llama", **options):
        key = (quant, model, tuple(sorted(options.items())))
        if key not in _BUILT:
            out = tmp_path_factory.mktemp(f"gptq-{quant}")
            fmt, source, facts = build_artifact(tiny_model(model), ("gptq", quant, options), out,
                                                calibration=CALIBRATION)  # fmt: skip
            _BUILT[key] = (out, facts, source)
        return _BUILT[key]

    return _build


def test_layer_wise_quantizer_beats_rtn_on_every_linear(build):
    _, facts, _ = build(group_size=32, desc_act=True, static_groups=True)
    assert facts["calibration"]["samples"] == 8 and len(facts["calibration"]["sha256"]) == 64
    linears = [e for layer in facts["layers"] for e in layer["errors"].values()]
    assert len(linears) == 2 * 7
    assert all(e["gptq"] < e["rtn"] for e in linears), linears


def test_artifact_layout_matches_gptqmodels_own(build):
    """Our checkpoint has the tensor names, dtypes and shapes GPTQModel writes for the same model and settings."""
    ours, _, _ = build(group_size=32, desc_act=True, static_groups=True)
    theirs, facts, _ = build(group_size=32, desc_act=True, static_groups=True, quantizer="gptqmodel")
    assert facts["quantizer"] == "gptqmodel"
    assert [layer["layer"] for layer in facts["layers"]] == [0, 1]  # GPTQModel's per-module losses, from its log
    assert set(facts["layers"][0]["errors"]) == {
        f"{p}_proj"
        for p in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "mlp.gate", "mlp.up", "mlp.down")
    }
    mine, reference = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert {n: tuple(t.shape) for n, t in mine.items()} == {n: tuple(t.shape) for n, t in reference.items()}
    packed = ("qweight", "qzeros", "scales", "g_idx")  # unquantized tensors: float16 ours, GPTQModel's choice theirs
    assert {n: t.dtype for n, t in mine.items() if n.endswith(packed)} == {
        n: t.dtype for n, t in reference.items() if n.endswith(packed)
    }
    for name in ("quantization_config",):
        ours_config = json.loads((ours / "config.json").read_text())[name]
        theirs_config = json.loads((theirs / "config.json").read_text())[name]
        for key in ("quant_method", "bits", "group_size", "sym", "lm_head", "checkpoint_format", "format"):
            assert ours_config[key] == theirs_config[key], key
        # GPTQModel writes desc_act: true for act-order with static groups; the g_idx is trivial, so ours says false
        # (vLLM refuses desc_act with groups) and records act-order in `meta`
        assert theirs_config["desc_act"] and not ours_config["desc_act"] and ours_config["meta"]["act_order"]
        assert torch.equal(mine["model.layers.0.mlp.up_proj.g_idx"], reference["model.layers.0.mlp.up_proj.g_idx"])
    quantize_config = json.loads((ours / "quantize_config.json").read_text())
    assert quantize_config["bits"] == 4 and quantize_config["group_size"] == 32


def cosine(a, b):
    return (a * b).sum(-1) / (abs(a) ** 2).sum(-1) ** 0.5 / (abs(b) ** 2).sum(-1) ** 0.5


def test_gptqmodel_and_transformers_load_it_and_agree_with_our_dequantization(build):
    from gptqmodel import BACKEND, GPTQModel

    from pipeline.runtimes.transformers import _dequantized_runtime

    cpu_workers()
    folder, _, _ = build(group_size=32, desc_act=True, static_groups=True)
    ids = list(range(100, 140))
    ours = _dequantized_runtime(folder).logits(ids)
    runtime = open_gptq(folder)  # transformers' from_pretrained with GPTQModel's exact torch kernel
    assert runtime.description["validated_by"].startswith("transformers") and "TorchLinear" in runtime.description[
        "runtime"]  # fmt: skip
    tensors, checked = load_file(folder / "model.safetensors"), 0
    for name, module in runtime.model.named_modules():
        if hasattr(module, "dequantize_weight"):  # the kernel's weights: ours, rounded once to float16
            checked += 1
            packed = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            assert torch.equal(module.dequantize_weight().T, G.from_checkpoint(packed, 4).half()), name
    assert checked == 2 * 7
    via_transformers = runtime.logits(ids)
    assert cosine(via_transformers, ours).min() > 0.9999 and (via_transformers.argmax(-1) == ours.argmax(-1)).all()
    model = GPTQModel.load(str(folder), device="cpu", backend=BACKEND.TORCH_INT8, dtype=torch.float32)
    with torch.inference_mode():
        kernel = model.model(torch.tensor([ids])).logits[0].float().numpy()
    # GPTQModel's own CPU kernel re-quantizes the weights to int8 per channel: close to ours, not equal
    assert cosine(kernel, ours).min() > 0.99 and (kernel.argmax(-1) == ours.argmax(-1)).mean() >= 0.75


def test_smoke_uses_gptqmodel_and_records_the_rtn_floor(build):
    from pipeline.reference import reference

    folder, _, source = build(group_size=32, desc_act=True, static_groups=True)
    validation = Validation(eval_tokens=256, context=128, max_new_tokens=6, prompts=["Hello there."])
    fmt = Format.for_target(Target(format="gptq", quant="int4", options={"group_size": 32}))
    result = fmt.validate(folder, reference(source, validation), validation)
    assert "gptqmodel" in result["smoke"]["validated_by"] and result["failures"] == []
    quality = result["quality"]
    assert quality["rtn_ppl_ratio"] > 0 and result["smoke"]["generation"]["cases"][0]["tokens"] == 6


def test_without_gptqmodel_the_check_says_it_dequantized(build, monkeypatch):
    import sys

    folder, _, _ = build(group_size=32, desc_act=True, static_groups=True)
    monkeypatch.setitem(sys.modules, "gptqmodel", None)
    runtime = open_gptq(folder)
    assert runtime.description["validated_by"].startswith("weightsmith's own dequantization")


def test_int8_and_shards(build):
    folder, _, _ = build("int8", group_size=64, shard_size=1_000_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(files) >= 2 and set(index["weight_map"].values()) == set(files)
    tensors = {}
    for name in files:
        tensors.update(load_file(folder / name))
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape == (64 * 8 // 32, 64)
    assert (tensors["model.layers.0.self_attn.q_proj.qzeros"] == 0x7F7F7F7F).all()


def test_group_size_must_divide_every_quantized_input(tiny_model):
    source = inspect_checkpoint(tiny_model("llama"))
    expected = (
        r"group size 128 does not divide the input size 64 of model\.layers\.0\.mlp\.gate_proj\.weight; "
        r"group sizes that fit every quantized tensor: 32, 64"
    )
    with pytest.raises(FormatError, match=expected):
        Format.for_target(Target(format="gptq", quant="int4", options={"group_size": 128})).check(source)


def test_a_gptq_no_better_than_rtn_fails():
    assert gptq_format.beats_rtn(1.11, 1.34) == []
    assert gptq_format.beats_rtn(1.0007, 1.0005) == []  # INT8: both within noise of the source
    (failure,) = gptq_format.beats_rtn(1.35, 1.34)
    assert "not below round-to-nearest's 1.3400" in failure


def test_the_layer_stream_holds_one_layer_at_a_time(tiny_model):
    """Each layer's weights are let go once its outputs are computed: the skeleton never fills up with the model."""
    from pipeline.archs import DENSE_LINEARS
    from pipeline.quantizers.layers import LayerStream

    stream = LayerStream(inspect_checkpoint(tiny_model("llama")), [list(range(1, 33))] * 2, DENSE_LINEARS)
    for index in range(stream.n_layers):
        layer, _, groups, _ = stream.collect(index)
        assert all(p.device.type == "cpu" for p in layer.parameters()) and len(groups) == 4  # qkv, o, gate/up, down
        stream.advance(layer)
        held = [p for layer in stream.model.model.layers for p in layer.parameters() if p.device.type != "meta"]
        assert held == []


@pytest.mark.parametrize(("spec", "refused"), [
    (G.QuantSpec(4, 128), None),
    (G.QuantSpec(4, 32, desc_act=True, static_groups=True), None),  # act-order, trivial g_idx: desc_act false
    (G.QuantSpec(4, -1, desc_act=True), None),
    (G.QuantSpec(4, 32, desc_act=True), "desc_act true"),  # scattered groups
    (G.QuantSpec(8, 64), "bits 8"),
    (G.QuantSpec(4, 128, sym=False), "sym false"),
    (G.QuantSpec(4, 256), "group_size 256"),
], ids=str)  # fmt: skip
def test_vllm_is_promised_only_what_its_gptq_loader_takes(spec, refused):
    """vLLM 0.32's GPTQ loader (measured, ../shared/FINDINGS.md): 4-bit symmetric, groups -1/32/64/128, no
    desc_act with groups. The config we write is judged by those rules."""
    why = gptq_format.vllm_refusal(gptq_format.quantization_config(spec))
    assert why is None if refused is None else refused in why


def test_a_refused_stack_gets_no_handoff_file_and_the_manifest_says_why(build):
    from pipeline.handoff import model_card
    from pipeline.types import Manifest, Status

    folder, _, source = build("int8", group_size=64, shard_size=1_000_000)
    fmt = Format.for_target(Target(format="gptq", quant="int8", options={"group_size": 64}))
    manifest = Manifest(model="tiny", target="gptq/int8", format="gptq", quant="int8", status=Status.OK,
                        source={"n_params": 135_000_000}, serving=fmt.serving(folder))  # fmt: skip
    assert not manifest.serving["vllm"].accepts and "bits 8" in manifest.serving["vllm"].why
    chat = {"context": 2048, "template": None, "published": folder, "stop_ids": [2], "stop": ["</s>"]}
    files = fmt.handoff_files(folder, manifest, chat)
    assert "vllm-serve.sh" not in files and "xinference.json" in files
    assert json.loads(files["xinference.json"])["model_specs"][0]["model_size_in_billions"] == "0_135"
    card = model_card(manifest, files, "transformers")
    assert "## Not for" in card and "- vllm: vLLM's GPTQ loader takes 4-bit" in card


@pytest.mark.parametrize("model", ["olmo2", "smollm3"])
def test_dense_variants_quantize_and_load_in_transformers(build, model):
    """OLMo 2 (q/k norms over whole projections, norms after each block) and SmolLM3 (no rope on every 4th layer):
    the same linears as Llama, so the same layer stream; transformers loads the artifact and agrees with ours."""
    from pipeline.runtimes.transformers import _dequantized_runtime

    cpu_workers()
    folder, facts, _ = build(model=model, group_size=32)
    linears = [e for layer in facts["layers"] for e in layer["errors"].values()]
    assert len(linears) == len(facts["layers"]) * 7 and all(e["gptq"] < e["rtn"] for e in linears), linears
    ids = list(range(100, 140))
    ours, runtime = _dequantized_runtime(folder).logits(ids), open_gptq(folder)
    assert runtime.description["validated_by"].startswith("transformers")
    theirs = runtime.logits(ids)
    assert cosine(theirs, ours).min() > 0.9999 and (theirs.argmax(-1) == ours.argmax(-1)).all()
