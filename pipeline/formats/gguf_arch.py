"""Architecture tables for GGUF export, keyed by the Hugging Face `model_type`.

Each table says, as data: which llama.cpp architecture the model becomes; which Hugging Face module becomes which
llama.cpp tensor (gguf-py's own MODEL_TENSOR names, so the output names are exactly what llama.cpp expects); which
config keys become which GGUF hyperparameters (a trailing non-string value is the default when no key is present);
whether q/k rows must be permuted (llama.cpp's `llama` rotates interleaved pairs, Hugging Face stores q/k for
rotate-half; the other architectures here use rotate-half in both); and whether norm weights are stored as an
offset from 1 (Gemma's RMSNorm multiplies by 1 + weight, llama.cpp by weight).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import gguf
from gguf import MODEL_ARCH
from gguf import MODEL_TENSOR as T

from pipeline.formats import FormatError

LAYER = "model.layers.{bid}"

# Hugging Face module path -> llama.cpp tensor, for decoders laid out like Llama (weight and bias share a path).
LLAMA_TENSORS = {
    "model.embed_tokens": T.TOKEN_EMBD,
    "model.norm": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
    f"{LAYER}.input_layernorm": T.ATTN_NORM,
    f"{LAYER}.self_attn.q_proj": T.ATTN_Q,
    f"{LAYER}.self_attn.k_proj": T.ATTN_K,
    f"{LAYER}.self_attn.v_proj": T.ATTN_V,
    f"{LAYER}.self_attn.o_proj": T.ATTN_OUT,
    f"{LAYER}.post_attention_layernorm": T.FFN_NORM,
    f"{LAYER}.mlp.gate_proj": T.FFN_GATE,
    f"{LAYER}.mlp.up_proj": T.FFN_UP,
    f"{LAYER}.mlp.down_proj": T.FFN_DOWN,
}

QWEN3_TENSORS = {
    **LLAMA_TENSORS,
    f"{LAYER}.self_attn.q_norm": T.ATTN_Q_NORM,
    f"{LAYER}.self_attn.k_norm": T.ATTN_K_NORM,
}

GEMMA2_TENSORS = {
    **{k: v for k, v in LLAMA_TENSORS.items() if v not in (T.OUTPUT, T.FFN_NORM)},
    f"{LAYER}.post_attention_layernorm": T.ATTN_POST_NORM,
    f"{LAYER}.pre_feedforward_layernorm": T.FFN_NORM,
    f"{LAYER}.post_feedforward_layernorm": T.FFN_POST_NORM,
}

PHI3_TENSORS = {
    "model.embed_tokens": T.TOKEN_EMBD,
    "model.norm": T.OUTPUT_NORM,
    "lm_head": T.OUTPUT,
    f"{LAYER}.input_layernorm": T.ATTN_NORM,
    f"{LAYER}.self_attn.qkv_proj": T.ATTN_QKV,
    f"{LAYER}.self_attn.o_proj": T.ATTN_OUT,
    f"{LAYER}.post_attention_layernorm": T.FFN_NORM,
    f"{LAYER}.mlp.gate_up_proj": T.FFN_UP,  # gate and up fused, gate first: llama.cpp's fused SwiGLU layout
    f"{LAYER}.mlp.down_proj": T.FFN_DOWN,
}

# GGUFWriter method -> Hugging Face config keys, first one present wins (rope keys may sit in `rope_parameters`).
COMMON_HPARAMS = {
    "add_context_length": ("max_position_embeddings",),
    "add_embedding_length": ("hidden_size",),
    "add_block_count": ("num_hidden_layers",),
    "add_feed_forward_length": ("intermediate_size",),
    "add_head_count": ("num_attention_heads",),
    "add_head_count_kv": ("num_key_value_heads", "num_attention_heads"),
    "add_layer_norm_rms_eps": ("rms_norm_eps",),
    "add_key_length": ("head_dim",),
    "add_value_length": ("head_dim",),
    "add_rope_freq_base": ("rope_theta",),
}


@dataclass(frozen=True)
class Architecture:
    gguf_arch: MODEL_ARCH
    tensors: dict[str, T]
    hparams: dict[str, tuple] = field(default_factory=lambda: dict(COMMON_HPARAMS))
    permute_qk: bool = False
    norm_offset: float = 0.0
    ignored: tuple[str, ...] = ("rotary_emb.inv_freq",)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


LLAMA = Architecture(
    MODEL_ARCH.LLAMA,
    LLAMA_TENSORS,
    {**COMMON_HPARAMS, "add_vocab_size": ("vocab_size",), "add_rope_dimension_count": ("rope_dimensions",)},
    permute_qk=True,
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,
    "mistral": LLAMA,  # llama.cpp runs Mistral (dense) as llama
    "qwen2": Architecture(MODEL_ARCH.QWEN2, LLAMA_TENSORS),
    "qwen3": Architecture(MODEL_ARCH.QWEN3, QWEN3_TENSORS),
    "gemma2": Architecture(
        MODEL_ARCH.GEMMA2,
        GEMMA2_TENSORS,
        {
            **COMMON_HPARAMS,
            "add_attn_logit_softcapping": ("attn_logit_softcapping",),
            "add_final_logit_softcapping": ("final_logit_softcapping",),
            "add_sliding_window": ("sliding_window",),
        },
        norm_offset=1.0,
        ignored=("rotary_emb.inv_freq", "lm_head.weight"),  # tied; llama.cpp uses the embeddings
    ),
    "phi3": Architecture(
        MODEL_ARCH.PHI3,
        PHI3_TENSORS,
        {
            **COMMON_HPARAMS,
            "add_rope_dimension_count": ("rope_dimensions",),
            "add_rope_scaling_orig_ctx_len": ("original_max_position_embeddings", "max_position_embeddings"),
            "add_sliding_window": ("sliding_window", 0),
        },
    ),
}

SUPPORTED_ROPE = ("default", "linear", "yarn", "llama3")


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


def rope(config: dict) -> dict:
    """The rope settings whichever way transformers wrote them (`rope_parameters` in 5.x, `rope_scaling` and a
    top-level `rope_theta` before), with `rope_type` set; FormatError for scalings llama.cpp is not given here."""
    settings = {"rope_theta": config.get("rope_theta"), **(config.get("rope_scaling") or {})}
    settings.update(config.get("rope_parameters") or {})
    kind = settings.get("rope_type", settings.get("type")) or "default"
    if kind not in SUPPORTED_ROPE:
        raise FormatError(
            f"GGUF export does not support rope scaling {kind!r} yet (supported: {', '.join(SUPPORTED_ROPE)})"
        )
    return {**settings, "rope_type": kind}


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def hparam(config: dict, key: str):
    """A hyperparameter from the config, looking into the rope settings too; `rope_dimensions` is derived."""
    if key == "rope_dimensions":
        return int(head_dim(config) * rope(config).get("partial_rotary_factor", 1.0))
    if config.get(key) is not None:
        return config[key]
    return rope(config).get(key)


def add_hparams(writer: gguf.GGUFWriter, arch: Architecture, config: dict) -> None:
    for method, keys in arch.hparams.items():
        values = [hparam(config, k) if isinstance(k, str) else k for k in keys]
        value = next((v for v in values if v is not None), None)
        if value is not None:
            getattr(writer, method)(value)
    settings = rope(config)
    if settings["rope_type"] in ("linear", "yarn") and settings.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(settings["rope_type"]))
        writer.add_rope_scaling_factor(settings["factor"])
        if settings["rope_type"] == "yarn":
            writer.add_rope_scaling_orig_ctx_len(settings["original_max_position_embeddings"])


def extra_tensors(arch: Architecture, config: dict) -> dict:
    """Tensors llama.cpp needs that the checkpoint does not hold: Llama 3.1's rope frequency factors."""
    import torch

    settings = rope(config)
    if settings["rope_type"] != "llama3":
        return {}
    dim = head_dim(config)
    freqs = 1.0 / (settings["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = settings.get("factor", 8.0)
    low, high = settings.get("low_freq_factor", 1.0), settings.get("high_freq_factor", 4.0)
    old_context = settings.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():  # Llama 3.1's frequency-dependent scaling, as llama.cpp applies it (freq / factor)
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight": torch.tensor(factors, dtype=torch.float32)}


def permute_qk(weights, n_head: int):
    """Reorder q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved-pair layout."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
