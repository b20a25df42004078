"""Architecture tables for GGUF export, keyed by the Hugging Face `model_type`.

Each table says, as data: which llama.cpp architecture the model becomes, which Hugging Face tensor becomes which
llama.cpp tensor (gguf-py's own MODEL_TENSOR names, so the output names are exactly what llama.cpp expects), which
config keys become which GGUF hyperparameters, and whether q/k must be permuted (llama.cpp's `llama` rotates
interleaved pairs, while Hugging Face stores q/k for rotate-half; `qwen2` uses rotate-half in both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import gguf
from gguf import MODEL_ARCH
from gguf import MODEL_TENSOR as T

from pipeline.formats import FormatError

# Hugging Face module path -> llama.cpp tensor, for decoders laid out like Llama (weights and biases share a path).
LLAMA_LIKE_TENSORS = {
    "model.embed_tokens": T.TOKEN_EMBD,
    "model.norm": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
    "model.layers.{bid}.input_layernorm": T.ATTN_NORM,
    "model.layers.{bid}.self_attn.q_proj": T.ATTN_Q,
    "model.layers.{bid}.self_attn.k_proj": T.ATTN_K,
    "model.layers.{bid}.self_attn.v_proj": T.ATTN_V,
    "model.layers.{bid}.self_attn.o_proj": T.ATTN_OUT,
    "model.layers.{bid}.post_attention_layernorm": T.FFN_NORM,
    "model.layers.{bid}.mlp.gate_proj": T.FFN_GATE,
    "model.layers.{bid}.mlp.up_proj": T.FFN_UP,
    "model.layers.{bid}.mlp.down_proj": T.FFN_DOWN,
}

# GGUFWriter method -> Hugging Face config keys (first one present wins).
LLAMA_LIKE_HPARAMS = {
    "add_context_length": ("max_position_embeddings",),
    "add_embedding_length": ("hidden_size",),
    "add_block_count": ("num_hidden_layers",),
    "add_feed_forward_length": ("intermediate_size",),
    "add_head_count": ("num_attention_heads",),
    "add_head_count_kv": ("num_key_value_heads", "num_attention_heads"),
    "add_layer_norm_rms_eps": ("rms_norm_eps",),
    "add_key_length": ("head_dim",),
    "add_value_length": ("head_dim",),
}


@dataclass(frozen=True)
class Architecture:
    gguf_arch: MODEL_ARCH
    tensors: dict[str, T]
    hparams: dict[str, tuple[str, ...]]
    permute_qk: bool = False
    extra_hparams: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ignored: tuple[str, ...] = ("rotary_emb.inv_freq",)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        MODEL_ARCH.LLAMA,
        LLAMA_LIKE_TENSORS,
        LLAMA_LIKE_HPARAMS,
        permute_qk=True,
        extra_hparams={"add_vocab_size": ("vocab_size",), "add_rope_dimension_count": ("head_dim",)},
    ),
    "qwen2": Architecture(MODEL_ARCH.QWEN2, LLAMA_LIKE_TENSORS, LLAMA_LIKE_HPARAMS),
}

SUPPORTED_ROPE = ("default", "linear", "yarn")


def architecture(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise FormatError(
            f"GGUF export does not support architecture {model_type!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]


def tensor_name(arch: Architecture, hf_name: str) -> str | None:
    """The llama.cpp name of a Hugging Face tensor, None for tensors llama.cpp does not use; FormatError if unknown."""
    if hf_name.endswith(arch.ignored):
        return None
    module, _, suffix = hf_name.rpartition(".")
    for pattern, kind in arch.tensors.items():
        regex = "^" + re.escape(pattern).replace(r"\{bid\}", r"(\d+)") + "$"
        if match := re.match(regex, module):
            bid = int(match.group(1)) if match.groups() else None
            return gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix
    raise FormatError(f"tensor {hf_name!r} has no GGUF mapping for architecture {arch.name!r}")


def rope_theta(config: dict) -> float | None:
    rope = config.get("rope_parameters") or {}
    return rope.get("rope_theta", config.get("rope_theta"))


def rope_scaling(config: dict) -> dict:
    """The rope scaling block whichever way transformers wrote it (`rope_parameters` in 5.x, `rope_scaling` before)."""
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise FormatError(
            f"GGUF export does not support rope scaling {kind!r} yet (supported: {', '.join(SUPPORTED_ROPE)})"
        )
    return {**rope, "rope_type": kind}


def add_hparams(writer: gguf.GGUFWriter, arch: Architecture, config: dict) -> None:
    for method, keys in {**arch.hparams, **arch.extra_hparams}.items():
        value = next((config[k] for k in keys if config.get(k) is not None), None)
        if value is None and method == "add_rope_dimension_count":
            value = config["hidden_size"] // config["num_attention_heads"]
        if value is not None:
            getattr(writer, method)(value)
    if (theta := rope_theta(config)) is not None:
        writer.add_rope_freq_base(theta)
    rope = rope_scaling(config)
    if rope["rope_type"] in ("linear", "yarn") and rope.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(rope["factor"])
        if rope["rope_type"] == "yarn":
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


def permute_qk(weights, n_head: int):
    """Reorder q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved-pair layout."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
