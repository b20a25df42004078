"""A Hugging Face architecture as llama.cpp sees it: its GGUF architecture, tensor names and hyperparameters.

The data is the field's own: tensor names come from gguf-py's `TensorNameMap` for the architecture the row of
`pipeline.archs` names (the map llama.cpp's own converter uses), so the output names are exactly what llama.cpp
expects; which config keys become which metadata is the row's `gguf_hparams` on top of `COMMON_HPARAMS`. q/k rows
are permuted where the row says so (llama.cpp's `llama`-style rope rotates interleaved pairs, Hugging Face stores
q/k for rotate-half), and norm weights stored as an offset from 1 (Gemma's RMSNorm multiplies by 1 + weight) get it
added back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import gguf

from pipeline.archs import ARCHS, COMMON_HPARAMS, Arch, arch, supported
from pipeline.types import FormatError

SUPPORTED_ROPE = ("default", "linear", "yarn", "llama3")
IGNORED = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; llama.cpp computes them


@dataclass(frozen=True)
class Architecture:
    """One model_type's row, bound to gguf-py's tensor map for its block count."""

    model_type: str
    row: Arch
    n_blocks: int

    @property
    def gguf_arch(self) -> gguf.MODEL_ARCH:
        return gguf.MODEL_ARCH[self.row.gguf]

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def permute_qk(self) -> bool:
        return self.row.permute_qk

    @property
    def norm_offset(self) -> float:
        return self.row.norm_offset

    @property
    def hparams(self) -> dict[str, tuple]:
        return {**COMMON_HPARAMS, **self.row.gguf_hparams}

    @cached_property
    def tensor_map(self) -> gguf.TensorNameMap:
        return gguf.TensorNameMap(self.gguf_arch, self.n_blocks)


def architecture(model_type: str, config: dict) -> Architecture:
    row = arch(model_type)
    if row.gguf is None:
        why = "not converted to GGUF yet" if model_type in ARCHS else "not in weightsmith's architecture table"
        raise FormatError(f"GGUF does not support architecture {model_type!r}: {why} (supported: "
                          f"{', '.join(supported('gguf'))})")  # fmt: skip
    return Architecture(model_type, row, config["num_hidden_layers"])


def tensor_name(arch: Architecture, hf_name: str) -> str | None:
    """The llama.cpp name of a Hugging Face tensor, None for tensors llama.cpp does not use; FormatError if unknown."""
    if hf_name.endswith(IGNORED) or hf_name in arch.row.gguf_skip:
        return None
    name = arch.tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise FormatError(f"tensor {hf_name!r} has no GGUF name for llama.cpp's {arch.name!r} (gguf-py's tensor map): "
                          f"this checkpoint has parts its architecture in llama.cpp does not")  # fmt: skip
    return name


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
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": torch.tensor(factors, dtype=torch.float32)}


def permute_qk(weights, n_head: int):
    """Reorder q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved-pair layout."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
