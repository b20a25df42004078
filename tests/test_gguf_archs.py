"""GGUF export of the 2026 families (Gemma 3 and 4, DeepSeek-V3, gpt-oss, Qwen 3.5 and its MoE, Qwen3-Next, Llama 4)
on tiny random checkpoints.

Each is checked the way a user would meet it: llama.cpp (through llama-cpp-python) loads the F16 file and gives
transformers' logits, and the Q4_K_M file made by llama.cpp's own quantizer stays close to them; the file holds the
tensors and metadata llama.cpp's architecture reads, the split and fused tensors carrying the checkpoint's numbers.
The tiny configs (tests/conftest.py) have hidden sizes of 256, so that the K-quants apply, and sliding windows
shorter than the prompt, so that the window and both layer kinds count.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import archs
from pipeline.formats.base import Format
from pipeline.runtimes.llama_cpp import LlamaCppRuntime
from pipeline.source import inspect_checkpoint, load_tokenizer
from pipeline.types import FormatError, Target
from tests.conftest import build_artifact, kl_divergence

# model_type -> llama.cpp's architecture
ARCHS = {"gemma3_text": "gemma3", "gemma4_text": "gemma4", "deepseek_v3": "deepseek2", "gpt_oss": "gpt-oss",
         "qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe", "qwen3_next": "qwen3next",
         "llama4_text": "llama4", "gemma4_text-moe": "gemma4"}  # fmt: skip
# the released Qwen 3.5 form: the same language models inside multimodal checkpoints (vision tower left out)
MULTIMODAL = {"qwen3_5": "qwen35", "qwen3_5_moe": "qwen35moe"}
TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
        "once or twice she had peeped into the book her sister was reading.")  # fmt: skip
_REFERENCE: dict = {}


@pytest.fixture(scope="module")
def build(gguf_build):
    return gguf_build


@pytest.fixture(scope="module")
def reference(tiny_model):
    """reference(model) -> (token ids, transformers' float32 logits) for the test text."""
    from transformers import AutoModelForCausalLM

    def _reference(model: str):
        if model not in _REFERENCE:
            folder = tiny_model(f"{model}-gguf")
            ids = load_tokenizer(folder)(TEXT).input_ids
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            with torch.inference_mode():
                _REFERENCE[model] = ids, hf(torch.tensor([ids])).logits[0].numpy()
        return _REFERENCE[model]

    return _reference


def llama_cpp_logits(path, ids) -> np.ndarray:
    runtime = LlamaCppRuntime(path, n_ctx=128)
    try:
        return runtime.logits(ids)
    finally:
        runtime.close()


@pytest.mark.parametrize("model", [*ARCHS, *MULTIMODAL])
def test_f16_logits_match_transformers(build, reference, model):
    ids, want = reference(model)
    assert len(ids) > 32  # longer than the sliding windows
    got = llama_cpp_logits(build(model, "f16")[0], ids)
    delta = np.abs(got - want).max()
    print(f"{model}: max |delta logit| {delta:.4f} (logits up to {np.abs(want).max():.2f})")
    bound = 1e-2 * np.abs(want).max()
    assert delta < bound, delta
    top2 = np.sort(want, -1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * bound  # where F16 rounding cannot swap transformers' top two tokens
    assert decided.mean() > 0.5 and (got.argmax(-1) == want.argmax(-1))[decided].all()
    assert want.std(-1).mean() > 0.5  # far from uniform: the comparison means something


@pytest.mark.parametrize("model", ARCHS)
def test_q4_k_m_stays_close_to_transformers(build, reference, model):
    path, info = build(model, "q4_k_m")
    assert info["route"] == "llama.cpp" and info["tensor_types"].get("Q4_K", 0) >= 4, info["tensor_types"]
    ids, want = reference(model)
    got = llama_cpp_logits(path, ids)
    divergence = kl_divergence(want, got)
    print(f"{model}: Q4_K_M KL to transformers {divergence:.4f}, tensor types {info['tensor_types']}")
    assert divergence < 0.25  # measured 0.02-0.04, 0.10-0.20 with the Gated DeltaNet; layouts are checked at F16


@pytest.mark.parametrize("model,arch", [*ARCHS.items(), *MULTIMODAL.items()])
def test_every_tensor_is_one_llama_cpp_reads(build, model, arch):
    reader = gguf.GGUFReader(build(model, "f16")[0])
    row = archs.arch(model.split("-")[0])  # a variant's row: gemma4_text-moe's is gemma4_text's
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[row.gguf]]}
    for tensor in reader.tensors:
        base = tensor.name.rsplit(".", 1)[0] if tensor.name.endswith((".weight", ".bias", ".scale")) else tensor.name
        generic = base.replace(f"blk.{base.split('.')[1]}.", "blk.{bid}.") if base.startswith("blk.") else base
        assert generic in known, tensor.name
    assert reader.get_field("general.architecture").contents() == arch


def fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def test_gemma3_metadata_holds_both_rope_bases_and_the_layer_kinds(build, tiny_model):
    config = json.loads((tiny_model("gemma3_text-gguf") / "config.json").read_text())
    got = fields(build("gemma3_text", "f16")[0])
    assert got["gemma3.rope.freq_base"] == 1000000.0 and got["gemma3.rope.freq_base_swa"] == 10000.0
    assert got["gemma3.attention.sliding_window"] == 16
    assert got["gemma3.attention.sliding_window_pattern"] == [t == "sliding_attention" for t in config["layer_types"]]
    assert got["gemma3.attention.key_length"] == 64 and "gemma3.final_logit_softcapping" not in got


def test_deepseek2_metadata_is_mla_as_mqa(build):
    got = fields(build("deepseek_v3", "f16")[0])
    expected = {"attention.head_count_kv": 1, "attention.key_length": 256 + 32, "attention.value_length": 256,
                "attention.key_length_mla": 64, "attention.value_length_mla": 64, "attention.kv_lora_rank": 256,
                "attention.q_lora_rank": 256, "rope.dimension_count": 32,
                "leading_dense_block_count": 1, "expert_count": 4, "expert_used_count": 2, "expert_shared_count": 1,
                "expert_feed_forward_length": 256, "expert_weights_scale": 2.5, "expert_weights_norm": True,
                "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID), "expert_group_count": 1,
                "expert_group_used_count": 1}  # fmt: skip
    assert {k: got[f"deepseek2.{k}"] for k in expected} == pytest.approx(expected)


def test_deepseek_kv_b_is_split_as_llama_cpp_absorbs_it(build, tiny_model):
    """kv_b [heads·(nope+v), rank] -> k_b [heads, rank, nope] and v_b [heads, v, rank] (torch order)."""
    source = load_file(tiny_model("deepseek_v3-gguf") / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(build("deepseek_v3", "f16")[0]).tensors}
    kv_b = source["model.layers.1.self_attn.kv_b_proj.weight"].reshape(4, 32 + 64, 256)
    for name, want in (("attn_k_b", kv_b[:, :32].transpose(1, 2)), ("attn_v_b", kv_b[:, 32:])):
        got = tensors[f"blk.1.{name}.weight"]
        np.testing.assert_array_equal(np.array(got.data).reshape(want.shape), want.half().numpy(), err_msg=name)
    assert "blk.1.attn_kv_b.weight" not in tensors
    assert tensors["blk.1.exp_probs_b.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # the router
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors  # the dense layer


def test_gpt_oss_experts_are_deinterleaved_and_transposed(build, tiny_model):
    source = load_file(tiny_model("gpt_oss-gguf") / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(build("gpt_oss", "f16")[0]).tensors}
    gate_up = source["model.layers.0.mlp.experts.gate_up_proj"]  # [experts, hidden, 2·inter], gate and up interleaved
    bias = source["model.layers.0.mlp.experts.gate_up_proj_bias"]
    for part, index in (("gate", 0), ("up", 1)):
        want = gate_up[..., index::2].transpose(1, 2)
        got = tensors[f"blk.0.ffn_{part}_exps.weight"]
        np.testing.assert_array_equal(np.array(got.data).reshape(want.shape), want.half().numpy(), err_msg=part)
        got_bias = np.array(tensors[f"blk.0.ffn_{part}_exps.bias"].data).reshape(4, -1)
        np.testing.assert_array_equal(got_bias, bias[..., index::2].numpy(), err_msg=part)
    assert "blk.0.attn_sinks.weight" in tensors


@pytest.mark.parametrize("model,mtp", [("deepseek_v3", "model.layers.2.eh_proj.weight"),
                                       ("qwen3_next", "mtp.fc.weight")])  # fmt: skip
def test_mtp_layers_are_left_out_as_llama_cpp_converter_does(build, tiny_model, tmp_path, model, mtp):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer past num_hidden_layers, Qwen3-Next's under `mtp.`;
    llama.cpp's files have none (its converter skips them, --no-mtp for qwen3next)."""
    from safetensors.torch import save_file

    from pipeline.checkpoint import Checkpoint
    from pipeline.formats.gguf import plan_tensors
    from pipeline.formats.gguf_arch import architecture

    source = edited(tiny_model(f"{model}-gguf"), tmp_path)
    tensors = load_file(source.path / "model.safetensors")
    tensors[mtp] = torch.zeros(256, 512)
    save_file(tensors, source.path / "model.safetensors", metadata={"format": "pt"})
    config = source.config()
    Format.for_target(Target(format="gguf", quant="f16")).check(source)
    plan = plan_tensors(Checkpoint(source.path), architecture(model, config), config, "f16")
    built = {t.name for t in gguf.GGUFReader(build(model, "f16")[0]).tensors}
    blocks = config["num_hidden_layers"]
    assert {p.gguf_name for p in plan} == built and not any(name.startswith(f"blk.{blocks}.") for name in built)


def edited(folder, tmp_path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return inspect_checkpoint(copy)


def test_mxfp4_packed_gpt_oss_experts_are_refused(tiny_model, tmp_path):
    """The released gpt-oss checkpoints keep their experts MXFP4-packed (`*_blocks`, `*_scales`): refused by name."""
    from safetensors.torch import save_file

    source = edited(tiny_model("gpt_oss-gguf"), tmp_path)
    tensors = load_file(source.path / "model.safetensors")
    tensors["model.layers.0.mlp.experts.down_proj_blocks"] = tensors.pop("model.layers.0.mlp.experts.down_proj")
    save_file(tensors, source.path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"down_proj_blocks is an MXFP4-packed expert tensor"):
        Format.for_target(Target(format="gguf", quant="f16")).check(source)


@pytest.mark.parametrize(
    "model,changes,why",
    [("gemma3_text", {"query_pre_attn_scalar": 128}, r"scales attention by 1/sqrt\(64\), this checkpoint by "
                                                      r"query_pre_attn_scalar 128"),
     ("gpt_oss", {"swiglu_limit": 5.0}, r"gpt-oss assumes swiglu_limit: 7\.0, this checkpoint has 5\.0"),
     ("deepseek_v3", {"rope_interleave": False}, r"deepseek2 assumes rope_interleave: True"),
     ("qwen3_next", {"norm_topk_prob": False}, r"qwen3next assumes norm_topk_prob: True"),
     ("qwen3_next", {"linear_value_head_dim": 32}, r"DeltaNet needs linear_key_head_dim == linear_value_head_dim"),
     ("gemma4_text", {"hidden_activation": "gelu"}, r"gemma4 assumes hidden_activation: 'gelu_pytorch_tanh'"),
     ("gemma4_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
      r"global layers with proportional rope only, this checkpoint has 'default'"),
     ("gemma4_text", {"rope_parameters": {"full_attention": {"rope_type": "proportional", "factor": 8.0}}},
      r"proportional rope is written unscaled, this checkpoint scales it by 8\.0"),
     ("gemma4_text", {"vocab_size_per_layer_input": 256}, r"vocab_size_per_layer_input 256 for vocab_size 49152"),
     ("gemma4_text", {"num_kv_shared_layers": 1}, r"last two unshared layers \(sliding, then global\), this "
                                                  r"checkpoint's are \['full_attention', 'sliding_attention'\]"),
     ("llama4_text", {"attention_chunk_size": 8}, r"llama4 assumes attention_chunk_size: 8192, this checkpoint has 8$"),
     ("llama4_text", {"use_qk_norm": False}, r"llama4 assumes use_qk_norm: True, this checkpoint has False"),
     ("llama4_text", {"no_rope_layers": [1, 1, 1, 1]}, r"llama4 assumes no_rope_layers: \[1, 1, 1, 0\]")],
)  # fmt: skip
def test_configs_llama_cpp_would_compute_differently_are_refused(tiny_model, tmp_path, model, changes, why):
    with pytest.raises(FormatError, match=why):
        Format.for_target(Target(format="gguf", quant="f16")).check(
            edited(tiny_model(f"{model}-gguf"), tmp_path, **changes)
        )


def test_qwen35_value_heads_are_tiled_and_a_is_negative_exp(build, tiny_model):
    """4 value heads over 2 key heads: grouped by key head in the checkpoint, tiled in the file (v0k0 v0k1 v1k0 ...)."""
    source = load_file(tiny_model("qwen3_5_text-gguf") / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(build("qwen3_5_text", "f16")[0]).tensors}
    a_log = source["model.layers.0.linear_attn.A_log"]
    np.testing.assert_allclose(np.array(tensors["blk.0.ssm_a"].data), -torch.exp(a_log)[[0, 2, 1, 3]].numpy())
    z = source["model.layers.0.linear_attn.in_proj_z.weight"].reshape(2, 2, 64, 256).transpose(0, 1).reshape(256, 256)
    np.testing.assert_array_equal(np.array(tensors["blk.0.attn_gate.weight"].data), z.half().numpy())
    assert tensors["blk.0.ssm_conv1d.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "blk.3.attn_q.weight" in tensors and "blk.3.ssm_a" not in tensors  # the full-attention layer


def test_qwen35_layer_kinds_llama_cpp_would_not_place_are_refused(tiny_model, tmp_path):
    kinds = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    with pytest.raises(FormatError, match=r"qwen35 needs every 4th layer full attention"):
        Format.for_target(Target(format="gguf", quant="f16")).check(edited(tiny_model("qwen3_5_text-gguf"), tmp_path,
                                                                            layer_types=kinds))  # fmt: skip


def test_qwen3_next_fused_qkvz_is_split_per_key_head_group(build, tiny_model):
    """in_proj_qkvz holds [q k v z] per key head (2 key heads, 2 value heads each): the file has q, k and v rows by
    kind (attn_qkv) and z (attn_gate), value heads grouped by key head as in the checkpoint; in_proj_ba stays fused."""
    source = load_file(tiny_model("qwen3_next-gguf") / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(build("qwen3_next", "f16")[0]).tensors}
    qkvz = source["model.layers.0.linear_attn.in_proj_qkvz.weight"].reshape(2, -1, 256)  # [key heads, q k v z, hidden]
    q, k, v, z = qkvz.split([64, 64, 128, 128], 1)
    qkv = torch.cat([part.reshape(-1, 256) for part in (q, k, v)])
    for name, want in (("attn_qkv", qkv), ("attn_gate", z.reshape(-1, 256)),
                       ("ssm_ba", source["model.layers.0.linear_attn.in_proj_ba.weight"])):  # fmt: skip
        got = np.array(tensors[f"blk.0.{name}.weight"].data)
        np.testing.assert_array_equal(got, want.half().numpy(), err_msg=name)
    a_log = source["model.layers.0.linear_attn.A_log"]
    np.testing.assert_allclose(np.array(tensors["blk.0.ssm_a"].data), -torch.exp(a_log).numpy())
    conv = source["model.layers.0.linear_attn.conv1d.weight"].squeeze(1)
    np.testing.assert_array_equal(np.array(tensors["blk.0.ssm_conv1d.weight"].data), conv.numpy())
    norm = source["model.layers.0.linear_attn.norm.weight"]  # the gated norm: its weight as is, the others 1 + weight
    np.testing.assert_array_equal(np.array(tensors["blk.0.ssm_norm.weight"].data), norm.numpy())
    assert "blk.0.ssm_in.weight" not in tensors and "blk.3.attn_q.weight" in tensors and "blk.3.ssm_a" not in tensors


def test_qwen3_next_metadata_has_the_layer_kinds_and_partial_rope(build):
    got = fields(build("qwen3_next", "f16")[0])
    expected = {"attention.recurrent_layers": [True, True, True, False], "full_attention_interval": 4,
                "rope.dimension_count": 16, "ssm.conv_kernel": 4, "ssm.state_size": 64, "ssm.group_count": 2,
                "ssm.time_step_rank": 4, "ssm.inner_size": 256, "expert_count": 4, "expert_used_count": 2,
                "expert_feed_forward_length": 256, "expert_shared_feed_forward_length": 256}  # fmt: skip
    assert {k: got[f"qwen3next.{k}"] for k in expected} == expected


def test_gemma4_metadata_has_both_layer_kinds_and_the_per_layer_embeddings(build):
    """Global layers with their own head size, rotating the whole head (proportional rope: the frequencies past the
    first quarter stopped by rope_freqs factors of 1e30), sliding ones rotating all of theirs."""
    path = build("gemma4_text", "f16")[0]
    got = fields(path)
    expected = {"attention.key_length": 32, "attention.value_length": 32, "attention.key_length_swa": 16,
                "attention.value_length_swa": 16, "rope.dimension_count": 32, "rope.dimension_count_swa": 16,
                "rope.freq_base": 1000000.0, "rope.freq_base_swa": 10000.0, "attention.sliding_window": 16,
                "attention.sliding_window_pattern": [True, False, True, False], "attention.shared_kv_layers": 0,
                "embedding_length_per_layer_input": 64, "final_logit_softcapping": 30.0,
                "attention.head_count_kv": 2}  # fmt: skip
    assert {k: got[f"gemma4.{k}"] for k in expected} == expected
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert list(tensors["rope_freqs.weight"].data) == [1.0] * 4 + [1e30] * 12
    assert list(tensors["blk.3.layer_output_scale.weight"].data) == [1.0]  # the checkpoint's layer_scalar
    assert tensors["per_layer_token_embd.weight"].shape.tolist() == [4 * 64, 49152]


def test_gemma4_without_a_cap_writes_zero_as_llama_cpp_would_cap_at_30(tiny_model, tmp_path):
    """llama.cpp's gemma4 caps final logits at 30 when the file names no cap; transformers caps at none."""
    source = edited(tiny_model("gemma4_text-gguf"), tmp_path, final_logit_softcapping=None)
    (out := tmp_path / "out").mkdir()
    _, _, info = build_artifact(source.path, ("gguf", "f16"), out)
    assert fields(out / info["file"])["gemma4.final_logit_softcapping"] == 0.0


def test_gemma4_shared_kv_double_wide_mlp_and_k_as_v_match_transformers(smollm2_dir, tmp_path):
    """The E2B/E4B and 31B layouts: the last layers reuse the KV cache of the last unshared layer of their kind with
    a double-wide MLP, and the global layers have one KV head whose keys are also the values (no v_proj)."""
    from tests.conftest import GGUF_CONFIGS, make_tiny_model

    kinds = ["sliding_attention", "full_attention"] * 3
    folder = make_tiny_model(tmp_path / "ckpt", "gemma4_text", smollm2_dir, base=GGUF_CONFIGS,
                             num_hidden_layers=6, layer_types=kinds, num_kv_shared_layers=2,
                             use_double_wide_mlp=True, attention_k_eq_v=True, num_global_key_value_heads=1)  # fmt: skip
    (out := tmp_path / "out").mkdir()
    _, _, info = build_artifact(folder, ("gguf", "f16"), out)
    got = fields(out / info["file"])
    assert got["gemma4.attention.shared_kv_layers"] == 2 and got["gemma4.feed_forward_length"] == [512] * 4 + [1024] * 2
    assert got["gemma4.attention.head_count_kv"] == [2, 1] * 3
    from transformers import AutoModelForCausalLM

    ids = load_tokenizer(folder)(TEXT).input_ids
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    delta = np.abs(llama_cpp_logits(out / info["file"], ids) - want).max()
    assert delta < 1e-2 * np.abs(want).max(), delta


def test_gemma4_with_a_gemma_tokenizer_is_written_as_llama_cpp_converter_writes_it(gemma_tokenizer_dir, tmp_path):
    """A Gemma tokenizer (SentencePiece-style BPE in tokenizer.json, no tokenizer.model) as llama.cpp's `gemma4`
    vocabulary, as its converter writes it: no pre-tokenizer name, no space prefix, BOS added; llama.cpp then
    tokenizes as transformers does and gives its logits."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import GGUF_CONFIGS, make_tiny_model

    folder = make_tiny_model(tmp_path / "ckpt", "gemma4_text", gemma_tokenizer_dir, base=GGUF_CONFIGS,
                             vocab_size_per_layer_input=520, pad_token_id=0)  # fmt: skip
    (out := tmp_path / "out").mkdir()
    _, _, info = build_artifact(folder, ("gguf", "f16"), out)
    got = fields(out / info["file"])
    assert got["tokenizer.ggml.model"] == "gemma4" and "tokenizer.ggml.pre" not in got
    assert got["tokenizer.ggml.add_space_prefix"] is False and got["tokenizer.ggml.add_bos_token"] is True
    tokenizer = load_tokenizer(folder)
    runtime = LlamaCppRuntime(out / info["file"], n_ctx=256)
    try:
        for text in (TEXT, " a leading space,  two spaces\n\nand newlines\n", "digits 12345, ünïcödé ✅\t tab"):
            assert runtime.tokenize(text) == tokenizer(text).input_ids, text
        ids = tokenizer(TEXT).input_ids
        logits = runtime.logits(ids)
    finally:
        runtime.close()
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits - want).max() < 1e-2 * np.abs(want).max()


def test_llama4_experts_are_split_gate_half_first_and_transposed(build, tiny_model):
    """transformers' fused gate_up_proj [experts, hidden, 2·inter] (gate half first) and down_proj [experts, inter,
    hidden] -> llama.cpp's [experts, out, in] (torch order); the shared expert and the dense layers as they are."""
    source = load_file(tiny_model("llama4_text-gguf") / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(build("llama4_text", "f16")[0]).tensors}
    gate_up, down = (source[f"model.layers.1.feed_forward.experts.{p}"] for p in ("gate_up_proj", "down_proj"))
    wants = {"ffn_gate_exps": gate_up[..., :256].transpose(1, 2), "ffn_up_exps": gate_up[..., 256:].transpose(1, 2),
             "ffn_down_exps": down.transpose(1, 2)}  # fmt: skip
    for name, want in wants.items():
        got = np.array(tensors[f"blk.1.{name}.weight"].data)
        np.testing.assert_array_equal(got, want.half().numpy(), err_msg=name)
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # the router
    assert "blk.1.ffn_up_shexp.weight" in tensors and "blk.0.ffn_up.weight" in tensors  # shared expert, dense layer
    got = fields(build("llama4_text", "f16")[0])
    assert (got["llama4.feed_forward_length"], got["llama4.expert_feed_forward_length"]) == (512, 256)
    assert got["llama4.interleave_moe_layer_step"] == 2 and got["llama4.expert_used_count"] == 1
