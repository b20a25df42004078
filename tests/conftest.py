"""Shared fixtures: tiny random checkpoints of each supported architecture, and the bundled SmolLM2 model.

Tiny models borrow the bundled SmolLM2 tokenizer (a real byte-level BPE whose llama.cpp pre-tokenizer is known) or a
SentencePiece model trained here on the shipped corpus. Their weights are random with a larger initializer range
than usual, so that their next-token distributions are far from uniform and top-1 comparisons mean something.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, initializer_range=0.25)  # fmt: skip
# Gated DeltaNet layers (linear attention) and a full attention layer
HYBRID = dict(SMALL, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=False, linear_key_head_dim=16,
              linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=2,
              layer_types=["linear_attention", "full_attention"])  # fmt: skip
HYBRID_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64)
TINY_CONFIGS = {
    "llama": dict(SMALL, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2": dict(SMALL, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen3": dict(SMALL, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "mistral": dict(SMALL, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "gemma2": dict(
        SMALL,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=512,
        rms_norm_eps=1e-6,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    ),
    "smollm3": dict(
        SMALL, num_hidden_layers=4, rope_theta=2000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0
    ),
    # mixture of experts: 4 experts, 2 per token
    "qwen3_moe": dict(
        SMALL,
        head_dim=32,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
    ),
    "mixtral": dict(
        SMALL,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    # added by a row of pipeline/archs.py alone (GGUF and MLX)
    "olmo2": dict(SMALL, rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "granite": dict(
        SMALL,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        embedding_multiplier=6.0,
        attention_multiplier=0.2,
        residual_multiplier=0.3,
        logits_scaling=4.0,
    ),
    "phi3": dict(
        SMALL,
        num_key_value_heads=4,
        original_max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
    ),
    # the 2026 families (MLX through mlx-lm). Hybrids have both layer kinds; transformers saves a text-only Qwen 3.5
    # as `qwen3_5_text` (its own row; the `qwen3_5` row is the released multimodal form)
    "qwen3_5_text": dict(HYBRID),
    "qwen3_5_moe_text": dict(HYBRID, **HYBRID_MOE),
    "qwen3_next": dict(HYBRID, **HYBRID_MOE, decoder_sparse_step=1, norm_topk_prob=True),
    "gemma3_text": dict(
        SMALL,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        tie_word_embeddings=True,
    ),  # fmt: skip
    # global layers with their own head size (`global_head_dim`), per-layer embeddings over the whole vocabulary
    "gemma4_text": dict(
        SMALL,
        head_dim=16,
        global_head_dim=32,
        sliding_window=8,
        rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention"],
        hidden_size_per_layer_input=64,
        vocab_size_per_layer_input=49152,
        tie_word_embeddings=True,
    ),
    "gpt_oss": dict(
        SMALL,
        intermediate_size=64,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": True,
            "original_max_position_embeddings": 32,
            "rope_theta": 150000.0,
        },
        tie_word_embeddings=False,
    ),  # fmt: skip
    # a dense first layer, then routed and shared experts; latent attention with q and kv low-rank projections
    "deepseek_v3": dict(
        SMALL,
        num_key_value_heads=4,
        moe_intermediate_size=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=64,
        q_lora_rank=64,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        head_dim=8,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # dense and MoE layers alternating, no rope on every 4th layer, chunked attention on the others
    "llama4_text": dict(
        SMALL,
        num_hidden_layers=4,
        intermediate_size=64,
        intermediate_size_mlp=128,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}

# Qwen 3.5's language model for GGUF: three Gated DeltaNet layers and one full-attention layer; 4 value heads over 2
# key heads (llama.cpp tiles them)
QWEN35_GGUF = dict(SMALL, hidden_size=256, num_hidden_layers=4, head_dim=64, linear_num_key_heads=2,
                   linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64, rms_norm_eps=1e-6,
                   tie_word_embeddings=False, initializer_range=0.05)  # fmt: skip
QWEN35_MOE_GGUF = dict(QWEN35_GGUF, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                       shared_expert_intermediate_size=256)  # fmt: skip
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=256)  # one vision block

# the 2026 families for GGUF (`<model_type>-gguf` in TINY_MODELS): hidden and intermediate sizes multiples of 256,
# so that llama.cpp's K-quants apply, and sliding windows shorter than the test prompts
GGUF_CONFIGS = {
    "gemma3_text": dict(
        SMALL,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=16,  # shorter than the test prompts: the window matters
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        initializer_range=0.05,
    ),
    # global layers with twice the sliding layers' head size, proportional rope, per-layer embeddings, final logit
    # soft-capping (as the released models have). Gemma 4 attends with scale 1 on rms-normed q and k, so a random
    # model's softmax sharpens with the head size (at 64/128, rounding the weights to F16 alone moves transformers'
    # logits by 0.1): small heads, many of them
    "gemma4_text": dict(
        SMALL,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=16,
        head_dim=16,
        global_head_dim=32,
        sliding_window=16,  # shorter than the test prompts: the window matters
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        hidden_size_per_layer_input=64,
        vocab_size_per_layer_input=49152,
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        initializer_range=0.05,
    ),
    # first layer dense, then 4 routed experts (2 per token) and a shared one; q and kv through their low-rank paths
    "deepseek_v3": dict(
        SMALL,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=256,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=256,
        kv_lora_rank=256,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.05,
    ),
    "qwen3_5_text": dict(QWEN35_GGUF, intermediate_size=512),
    # the released form: the language model above inside a multimodal checkpoint, with a one-block vision tower
    "qwen3_5": dict(
        text_config=None,  # filled in below, from qwen3_5_text
        vision_config=VISION,
        tie_word_embeddings=False,
    ),
    "qwen3_5_moe_text": dict(QWEN35_MOE_GGUF),
    # Qwen3-Next: the MoE above with Qwen3-Next's fused projections (in_proj_qkvz, in_proj_ba) and top-k
    # renormalisation, as llama.cpp's qwen3next computes it
    "qwen3_next": dict(QWEN35_MOE_GGUF, decoder_sparse_step=1, norm_topk_prob=True),
    "qwen3_5_moe": dict(
        text_config=None,  # filled in below, from qwen3_5_moe_text
        vision_config=VISION,
        tie_word_embeddings=False,
    ),
    "gpt_oss": dict(
        SMALL,
        hidden_size=256,
        intermediate_size=256,
        head_dim=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=131072,  # gpt-oss's YaRN: 32 x 4096
        sliding_window=16,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.05,
    ),
    # Llama 4 as llama.cpp's llama4 runs it: chunks of 8192 tokens (fixed in llama.cpp), every 2nd layer sparse
    "llama4_text": dict(
        TINY_CONFIGS["llama4_text"],
        hidden_size=256,
        intermediate_size=256,
        intermediate_size_mlp=512,
        head_dim=64,
        attention_chunk_size=8192,
        initializer_range=0.05,
    ),
}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M checkpoint (made once in the weightsmith cache, about 30 s the first time)."""
    from pipeline.source import resolve_source
    from pipeline.types import SourceSpec

    return resolve_source(SourceSpec(id="bundled:smollm2-135m")).path


def make_tiny_model(folder: Path, model_type: str, tokenizer_dir: Path, seed: int = 0, base: dict | None = None,
                    **overrides) -> Path:  # fmt: skip
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer_config = (
        json.loads((tokenizer_dir / "config.json").read_text()) if (tokenizer_dir / "config.json").is_file() else {}
    )
    vocab_size = overrides.pop("vocab_size", tokenizer_config.get("vocab_size", 49152))
    settings = {**(TINY_CONFIGS if base is None else base)[model_type], **overrides}
    tokens = dict(vocab_size=vocab_size, bos_token_id=tokenizer_config.get("bos_token_id", 1),
                  eos_token_id=tokenizer_config.get("eos_token_id", 2))  # fmt: skip
    if "vision_config" in settings:  # a multimodal checkpoint (its language model under text_config), saved whole
        from transformers import AutoModelForImageTextToText as model_class

        settings["text_config"] = {**settings["text_config"], **tokens}
    else:
        model_class = AutoModelForCausalLM
        settings.update(tokens)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = model_class.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # transformers initialises norms and scales to 1, biases to 0: make them count in the tests
        for name, param in model.named_parameters():
            # also DeepSeek's e_score_correction_bias, gpt-oss's *_bias, Gemma 4's router scale and per-expert scale
            if "norm" in name or name.endswith(("bias", "scale")):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES + ("tokenizer.model",):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


GGUF_CONFIGS["qwen3_5"]["text_config"] = GGUF_CONFIGS["qwen3_5_text"]
GGUF_CONFIGS["qwen3_5_moe"]["text_config"] = GGUF_CONFIGS["qwen3_5_moe_text"]

# name -> (model_type, config overrides): the tiny checkpoints tests can ask for by name.
TINY_MODELS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {"attention_bias": True}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "gemma2": ("gemma2", {}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "smollm3": ("smollm3", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "mixtral": ("mixtral", {}),
    "granite": ("granite", {}),
    "llama-4-layers": ("llama", {"num_hidden_layers": 4}),
    # Gemma 4's MoE variant: a sparse block of 4 experts (2 per token) beside each layer's dense MLP
    "gemma4_text-moe": ("gemma4_text", {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                                        "moe_intermediate_size": 64}),
    **{name: (name, {}) for name in ("qwen3_next", "gemma3_text", "gemma4_text", "gpt_oss", "deepseek_v3",
                                     "llama4_text", "qwen3_5_text", "qwen3_5_moe_text")},
    # (model_type, overrides, GGUF_CONFIGS): the GGUF tests' checkpoints; the released Qwen 3.5 form is multimodal
    **{f"{name}-gguf": (name, {}, GGUF_CONFIGS) for name in GGUF_CONFIGS},
    # a seed whose routers have no near tie on the test texts (seed 0's second and third experts are 1e-4 apart at
    # one position: F16 rounding swaps them in llama.cpp, moving that position's logits by 1.4)
    "qwen3_next-gguf": ("qwen3_next", {"seed": 14}, GGUF_CONFIGS),
    "qwen3_5": ("qwen3_5", {}, GGUF_CONFIGS),
    "qwen3_5_moe": ("qwen3_5_moe", {}, GGUF_CONFIGS),
    "gemma4_text-moe-gguf": ("gemma4_text", {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                                             "moe_intermediate_size": 256}, GGUF_CONFIGS),
    "llama3-rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64}}),
    # hidden and intermediate sizes that are multiples of 256, so that llama.cpp's K-quants really apply
    "llama-256": ("llama", {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "initializer_range": 0.05}),
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_dir):
    """tiny_model(name) -> folder of that tiny checkpoint (see TINY_MODELS), made once per test session."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            model_type, overrides, *base = TINY_MODELS[name]
            # a neutral folder name: it becomes the model's name (GGUF `general.name`), and llama.cpp applies family
            # vocabulary rules by that name (a tiny phi3 borrowing SmolLM2's tokenizer, named "phi3", will not load)
            made[name] = make_tiny_model(tmp_path_factory.mktemp("tiny"), model_type, smollm2_dir,
                                         base=base[0] if base else None, **overrides)  # fmt: skip
        return made[name]

    return get


@pytest.fixture(scope="session")
def gguf_build(tiny_model, tmp_path_factory):
    """gguf_build(model, quant) -> (GGUF file, build facts) of the `<model>-gguf` tiny checkpoint, built once per test
    session: the GGUF family tests and the architecture matrix read the same files (neither writes to them)."""
    built: dict = {}

    def get(model: str, quant: str):
        if (model, quant) not in built:
            out = tmp_path_factory.mktemp(f"{model}-{quant}")
            _, _, info = build_artifact(tiny_model(f"{model}-gguf"), ("gguf", quant), out)
            built[model, quant] = (out / info["file"], info)
        return built[model, quant]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model) -> Path:
    return tiny_model("qwen2")


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    """A Llama-style SentencePiece tokenizer (BPE, byte fallback, identity normalisation) trained on the corpus."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from pipeline.corpus import CORPUS_FILE

    folder = tmp_path_factory.mktemp("spm-tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS_FILE.read_text().split("\n")),
        model_writer=model,
        vocab_size=512,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
            }
        )
    )
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # adds the tokenizer.json transformers derives
    # transformers 5 derives a Metaspace(prepend_scheme=first) pre-tokenizer that drops sentencepiece's dummy prefix
    # before a leading space; write the normalizer Llama 2's own tokenizer.json has, which matches sentencepiece.
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    tokenizer["pre_tokenizer"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "config.json").write_text(json.dumps({"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}))
    return folder


@pytest.fixture(scope="session")
def gemma_tokenizer_dir(tmp_path_factory) -> Path:
    """A Gemma-style tokenizer: SentencePiece BPE with byte fallback trained on the corpus (no dummy prefix, <pad>
    <eos> <bos> <unk> first), as transformers' GemmaTokenizer saves it: tokenizer.json only, spaces as ▁."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from pipeline.corpus import CORPUS_FILE

    folder = tmp_path_factory.mktemp("gemma-tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS_FILE.read_text().split("\n")), model_writer=model,
                                   vocab_size=512, model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                                   eos_piece="<eos>", bos_piece="<bos>", character_coverage=1.0,
                                   minloglevel=2)  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    settings = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # tokenizer.json, with an added <mask> (id 512)
    (folder / "tokenizer.model").unlink()
    (folder / "config.json").write_text(json.dumps({"vocab_size": 520, "bos_token_id": 2, "eos_token_id": 1}))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_spm(tmp_path_factory, spm_tokenizer_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-spm"), "llama", spm_tokenizer_dir, vocab_size=512)


def build_artifact(source_dir: Path, target, out: Path, **context):
    """Check and build `target` (a Target, or (format, quant[, options])) from the checkpoint at `source_dir` into
    `out`, as the build step does; return (format, source, build facts)."""
    from pipeline.formats.base import BuildContext, Format
    from pipeline.source import inspect_checkpoint
    from pipeline.types import Target

    if not isinstance(target, Target):
        target = Target(format=target[0], quant=target[1], options=target[2] if len(target) > 2 else {})
    source = inspect_checkpoint(source_dir)
    fmt = Format.for_target(target)
    fmt.check(source)
    return fmt, source, fmt.build(source, out, BuildContext(name=context.pop("name", "tiny"), **context))


def run_target(recipe, source, key: str, steps=None, force: bool = False, inputs=None):
    """Run the plan's steps of target `key` (all of them, or those named in `steps`) as a run does, given the
    manifests of the targets it is made from (`inputs`); return its manifest after the last one."""
    from pipeline.convert import run_step, should_run
    from pipeline.plan import make_plan

    plan, current = make_plan(recipe.select([key])), None
    for planned in plan.steps:
        if planned.key == key and (steps is None or planned.step in steps) and should_run(planned, current):
            current = run_step(recipe, source, plan, planned, current, {k: inputs[k] for k in planned.inputs}, force)
    return current


def kl_divergence(reference, other) -> float:
    """Mean KL divergence from `reference`'s next-token distributions to `other`'s (logits [positions, vocab])."""
    import torch

    p = torch.log_softmax(torch.as_tensor(reference), -1)
    q = torch.log_softmax(torch.as_tensor(other), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def write_recipe(folder: Path, source: Path | str, targets: list[tuple[str, str]], **validation) -> Path:
    """A recipe file converting `source` into `targets`, with its output under `folder`."""
    import yaml

    recipe = {
        "name": "test-model",
        "source": str(source),
        "targets": [{"format": f, "quant": q} for f, q in targets],
        "validation": {
            "eval_tokens": 256,
            "context": 128,
            "max_new_tokens": 8,
            "prompts": ["Hello there."],
            **validation,
        },
        "output": str(folder / "artifacts"),
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# (model, target, max |Δlogit|, max |logit|, top-1 agreement, logits' correlation) of every built cell of
# tests/test_arch_matrix.py
MATRIX_RESULTS: list[tuple] = []


def pytest_terminal_summary(terminalreporter):
    """The architecture matrix's figures, cell by cell, after the run (what the test measured, not what it assumed)."""
    if not MATRIX_RESULTS:
        return
    terminalreporter.section("architecture matrix: built cells against transformers' float32 logits")
    terminalreporter.write_line(f"{'model_type':<18} {'target':<12} {'max|Δlogit|':>11} {'max|logit|':>10} "
                                f"{'top1':>5} {'corr':>6}")  # fmt: skip
    for model, target, gap, scale, top1, r in sorted(MATRIX_RESULTS):  # float cells: corr and greedy tokens decided
        r = f"{r:>6.3f}" if isinstance(r, float) else r
        terminalreporter.write_line(f"{model:<18} {target:<12} {gap:>11.4f} {scale:>10.2f} {top1:>5.2f} {r}")
