"""A Hugging Face architecture as llama.cpp sees it: its GGUF architecture, tensor names and hyperparameters.

The data is the field's own: tensor names come from gguf-py's `TensorNameMap` for the architecture the row of
`pipeline.archs` names (the map llama.cpp's own converter uses), so the output names are exactly what llama.cpp
expects; which config keys become which metadata is the row's `gguf_hparams` on top of `COMMON_HPARAMS`, a value no
config key holds as such being one of the named `DERIVED` values. q/k rows are permuted where the row says so
(llama.cpp's `llama`-style rope rotates interleaved pairs, Hugging Face stores q/k for rotate-half), and norm weights
stored as an offset from 1 (Gemma's RMSNorm multiplies by 1 + weight) get it added back.

Where llama.cpp keeps a tensor in another layout than the checkpoint (DeepSeek's kv_b split in two for its MLA,
gpt-oss's fused and interleaved experts), the row names a small transform of `TRANSFORMS`: it maps one checkpoint
tensor to the (name, function) pieces llama.cpp's converter writes, named so that gguf-py's map knows them. Shapes
are planned by running the functions on torch's `meta` tensors, so planning still reads no weights. What a config
value alone cannot rule out (llama.cpp computes something the checkpoint does not) is a named check of `CHECKS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import gguf

from pipeline.archs import ARCHS, COMMON_HPARAMS, Arch, arch, supported
from pipeline.checkpoint import MXFP4_PARTS, mxfp4_packed
from pipeline.types import FormatError

# "proportional" (Gemma 4's global layers): the frequencies of a whole head, only the first `partial_rotary_factor` of
# them turning; llama.cpp rotates the whole head with `rope_freqs` factors that stop the others (`extra_tensors`)
SUPPORTED_ROPE = ("default", "linear", "yarn", "llama3", "proportional")
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
        why = row.gguf_refused or "not converted to GGUF yet"
        if model_type not in ARCHS:
            why = "not in weightsmith's architecture table"
        raise FormatError(f"GGUF does not support architecture {model_type!r}: {why} (supported: "
                          f"{', '.join(supported('gguf'))})")  # fmt: skip
    return Architecture(model_type, row, config["num_hidden_layers"])


def text_config(config: dict) -> dict:
    """The language model's settings: a multimodal checkpoint's `text_config` over its top level, as llama.cpp's
    converter reads them."""
    return {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config


def tensor_name(arch: Architecture, hf_name: str) -> str | None:
    """The llama.cpp name of a Hugging Face tensor, None for tensors llama.cpp does not use; FormatError if unknown.
    A `gguf_skip` entry ending in "." skips every tensor under that prefix (a vision tower)."""
    skipped = arch.row.gguf_skip
    if hf_name.endswith(IGNORED) or hf_name in skipped or hf_name.startswith(tuple(p for p in skipped if p[-1] == ".")):
        return None
    hf_name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")  # DeepSeek's router bias
    name = arch.tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias", ".scale"))
    if name is None:
        raise FormatError(f"tensor {hf_name!r} has no GGUF name for llama.cpp's {arch.name!r} (gguf-py's tensor map): "
                          f"this checkpoint has parts its architecture in llama.cpp does not")  # fmt: skip
    return name


def rope(config: dict) -> dict:
    """The rope settings whichever way transformers wrote them (`rope_parameters` in 5.x, `rope_scaling` and a
    top-level `rope_theta` before), with `rope_type` set; FormatError for scalings llama.cpp is not given here."""
    settings = {"rope_theta": config.get("rope_theta"), **(config.get("rope_scaling") or {})}
    parameters = config.get("rope_parameters") or {}
    settings.update(parameters.get("full_attention", parameters))  # per layer kind (Gemma 3): the global layers'
    kind = settings.get("rope_type", settings.get("type")) or "default"
    if kind not in SUPPORTED_ROPE:
        raise FormatError(
            f"GGUF export does not support rope scaling {kind!r} yet (supported: {', '.join(SUPPORTED_ROPE)})"
        )
    return {**settings, "rope_type": kind}


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _sliding_layers(config: dict) -> list[bool] | None:
    """Which layers use the sliding window, from the checkpoint's `layer_types`: llama.cpp reads this per-layer list
    before its built-in pattern (every 6th layer global for gemma3, every 2nd for gpt-oss), which the converter
    leaves it to assume."""
    kinds = config.get("layer_types")
    return [kind == "sliding_attention" for kind in kinds] if kinds else None


def _yarn_log_mul(config: dict) -> float | None:
    """DeepSeek's YaRN `mscale_all_dim`, written times 0.1 as llama.cpp's converter does (llama.cpp divides it back)."""
    mscale = rope(config).get("mscale_all_dim")
    return None if mscale is None else 0.1 * mscale


def _rope_dimensions(config: dict, factor: float = 1.0) -> int:
    """The rotated dimensions of a head: `partial_rotary_factor` of the rope settings or the top level (the original
    releases' configs), else `factor`, as llama.cpp's converter reads it."""
    settings = rope(config)
    if settings["rope_type"] == "proportional":  # the whole head turns, its last frequencies stopped (rope_freqs)
        return head_dim(config)
    factor = settings.get("partial_rotary_factor", config.get("partial_rotary_factor", factor))
    return int(head_dim(config) * factor)


def _full_attention_layer(config: dict, key: str):
    """A setting of the global (full attention) layers where Gemma 4 gives them their own: the top-level
    `global_<key>` of the released configs, else the first full-attention layer's entry of `per_layer_config` (what
    transformers saves), as llama.cpp's converter looks them up; None where neither has it."""
    if config.get(f"global_{key}") is not None:
        return config[f"global_{key}"]
    kinds = config.get("layer_types") or []
    for layer, settings in (config.get("per_layer_config") or {}).items():
        if int(layer) < len(kinds) and kinds[int(layer)] == "full_attention" and key in settings:
            return settings[key]
    return None


def _gemma4_head_count_kv(config: dict) -> list[int] | None:
    """Per-layer KV heads where Gemma 4's global layers have their own count (the k-equals-v variants)."""
    full = _full_attention_layer(config, "num_key_value_heads")
    if full is None or config.get("num_key_value_heads") is None:
        return None
    return [config["num_key_value_heads"] if swa else full for swa in _sliding_layers(config)]


def _gemma4_feed_forward_lengths(config: dict) -> list[int] | None:
    """Gemma 4's double-wide MLP: the layers that reuse another layer's KV cache have twice the intermediate size."""
    if not config.get("use_double_wide_mlp"):
        return None
    first_shared = config["num_hidden_layers"] - config.get("num_kv_shared_layers", 0)
    size = config["intermediate_size"]
    return [size if layer < first_shared else 2 * size for layer in range(config["num_hidden_layers"])]


def _swa_rope_dimensions(config: dict) -> int:
    """The rotated dimensions of a sliding layer's head (Gemma 4: all of them unless its rope settings say less)."""
    settings = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
    return int(head_dim(config) * settings.get("partial_rotary_factor", 1.0))


# values no single config key holds, by the name a row's `gguf_hparams` gives them
DERIVED = {
    "rope_dimensions": _rope_dimensions,
    "qwen3_next_rope_dimensions": lambda c: _rope_dimensions(c, 0.25),  # transformers' and the converter's default
    "rope_theta_swa": lambda c: ((c.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta"),
    "sliding_layers": _sliding_layers,
    "mla_key_length": lambda c: c["kv_lora_rank"] + c["qk_rope_head_dim"],  # MQA over the latent and the rope part
    "mla_key_length_mha": lambda c: c["qk_nope_head_dim"] + c["qk_rope_head_dim"],
    "norm_topk_prob_if_set": lambda c: True if c.get("norm_topk_prob") else None,
    "sigmoid_routing": lambda c: gguf.ExpertGatingFuncType.SIGMOID,
    "deepseek_yarn_log_mul": _yarn_log_mul,
    "ssm_inner_size": lambda c: c["linear_value_head_dim"] * c["linear_num_value_heads"],
    # which layers are Gated DeltaNet (llama.cpp reads this list before `full_attention_interval`)
    "recurrent_layers": lambda c: [k == "linear_attention" for k in c["layer_types"]] if c.get("layer_types") else None,
    # Qwen 3.5's interleaved M-RoPE sections (text positions are equal in all of them), padded to 4 as llama.cpp reads
    "mrope_sections": lambda c: [*rope(c).get("mrope_section", [11, 11, 10]), 0, 0, 0][:4],
    # Gemma 4: the global layers' head size (also their rotated dimensions: proportional rope turns the whole head),
    # their KV heads, the sliding layers' rotated dimensions, the double-wide MLP
    "global_head_dim": lambda c: _full_attention_layer(c, "head_dim"),
    "gemma4_head_count_kv": _gemma4_head_count_kv,
    "swa_rope_dimensions": _swa_rope_dimensions,
    "gemma4_feed_forward_lengths": _gemma4_feed_forward_lengths,
}


def hparam(config: dict, key: str):
    """A hyperparameter from the config, looking into the rope settings too, or one of the `DERIVED` values."""
    if key in DERIVED:
        return DERIVED[key](config)
    if config.get(key) is not None:
        return config[key]
    return rope(config).get(key)


# GGUFWriter methods of the gguf-py vendored with llama.cpp (llama-cpp-python 0.3.36) that the installed gguf-py
# lacks, by the key they write (an array)
NEWER_KEYS = {"add_recurrent_layers": "{arch}.attention.recurrent_layers"}


def _writer_method(writer: gguf.GGUFWriter, method: str):
    if hasattr(writer, method):
        return getattr(writer, method)
    key = NEWER_KEYS[method].format(arch=writer.arch)
    return lambda value: writer.add_array(key, value)


def add_hparams(writer: gguf.GGUFWriter, arch: Architecture, config: dict) -> None:
    for method, keys in arch.hparams.items():
        values = [hparam(config, k) if isinstance(k, str) else k for k in keys]
        value = next((v for v in values if v is not None), None)
        if value is not None:
            _writer_method(writer, method)(value)
    settings = rope(config)
    if settings["rope_type"] in ("linear", "yarn") and settings.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(settings["rope_type"]))
        writer.add_rope_scaling_factor(settings["factor"])
        if settings["rope_type"] == "yarn":
            writer.add_rope_scaling_orig_ctx_len(settings["original_max_position_embeddings"])
            for key, method in YARN_EXTRAS.items():
                if settings.get(key) is not None:
                    getattr(writer, method)(settings[key])


# YaRN settings beyond the factor that llama.cpp's converter writes when the checkpoint has them
YARN_EXTRAS = {
    "extrapolation_factor": "add_rope_scaling_yarn_ext_factor",
    "attention_factor": "add_rope_scaling_yarn_attn_factor",
    "beta_fast": "add_rope_scaling_yarn_beta_fast",
    "beta_slow": "add_rope_scaling_yarn_beta_slow",
}


def extra_tensors(arch: Architecture, config: dict) -> dict:
    """Tensors llama.cpp needs that the checkpoint does not hold: the rope frequency factors of Llama 3.1's scaling
    and of proportional rope."""
    import torch

    factors = {"llama3": _llama3_factors, "proportional": _proportional_factors}.get(rope(config)["rope_type"])
    if factors is None:
        return {}
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return {name: torch.tensor(factors(config), dtype=torch.float32)}


def _llama3_factors(config: dict) -> list[float]:
    """Llama 3.1's frequency-dependent scaling, as llama.cpp applies it (freq / factor)."""
    import torch

    settings = rope(config)
    dim = head_dim(config)
    freqs = 1.0 / (settings["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = settings.get("factor", 8.0)
    low, high = settings.get("low_freq_factor", 1.0), settings.get("high_freq_factor", 4.0)
    old_context = settings.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def _proportional_factors(config: dict) -> list[float]:
    """Proportional rope (Gemma 4's global layers) turns the first `partial_rotary_factor` of a whole head's
    frequencies and leaves the rest still; llama.cpp rotates the whole head (neox pairs, as transformers does) and
    stops the rest with a factor of 1e30 each, as llama.cpp's converter writes them."""
    dim = DERIVED["global_head_dim"](config) or head_dim(config)
    turning = int(dim * rope(config).get("partial_rotary_factor", 1.0) / 2)
    return [1.0] * turning + [1e30] * (dim // 2 - turning)


def permute_qk(weights, n_head: int):
    """Reorder q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved-pair layout."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# --- tensor transforms: one checkpoint tensor -> the pieces llama.cpp's converter writes -------------------------
# Each takes the checkpoint name and the config and returns None (not its tensor) or [(name, function)], the names
# being ones gguf-py's tensor map knows and the functions torch -> torch (run on `meta` tensors to plan shapes).


def _mla_kv_b_split(name: str, config: dict):
    """DeepSeek's kv_b [heads·(nope+v), rank] as llama.cpp's MLA absorbs it: k_b [heads, rank, nope] (transposed)
    and v_b [heads, v, rank]."""
    if not name.endswith(".kv_b_proj.weight"):
        return None
    heads, nope, v = config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"]

    def per_head(t):
        return t.reshape(heads, nope + v, t.shape[-1])

    return [(name.replace("kv_b_proj", "k_b_proj"), lambda t: per_head(t)[:, :nope].transpose(1, 2)),
            (name.replace("kv_b_proj", "v_b_proj"), lambda t: per_head(t)[:, nope:])]  # fmt: skip


def _fused_experts(name: str, interleaved: bool):
    """Experts stored fused as transformers keeps them (gate_up_proj [experts, hidden, 2·inter], down_proj [experts,
    inter, hidden], biases beside them) as llama.cpp's separate [experts, out, in] tensors. gpt-oss interleaves the
    gate and up columns, Llama 4 stores the gate half first."""
    base, _, part = name.rpartition(".")
    if not base.endswith(".experts"):
        return None
    if part.endswith(MXFP4_PARTS):
        raise mxfp4_packed("GGUF", name, "not repacked for llama.cpp here")

    def gate(t):
        return t[..., ::2] if interleaved else t[..., : t.shape[-1] // 2]

    def up(t):
        return t[..., 1::2] if interleaved else t[..., t.shape[-1] // 2 :]

    forms = {
        "gate_up_proj": [(f"{base}.gate_proj.weight", lambda t: gate(t).transpose(-1, -2)),
                         (f"{base}.up_proj.weight", lambda t: up(t).transpose(-1, -2))],
        "gate_up_proj_bias": [(f"{base}.gate_proj.bias", gate), (f"{base}.up_proj.bias", up)],
        "down_proj": [(f"{base}.down_proj.weight", lambda t: t.transpose(-1, -2))],
        "down_proj_bias": [(f"{base}.down_proj.bias", lambda t: t)],
    }  # fmt: skip
    return forms.get(part)


def _suffixless(ending: str):
    """The transform of a parameter or buffer without a `.weight` suffix (gpt-oss's per-head attention sinks, Gemma 4's
    per-layer output scale): the tensor as it is, under the `.weight` name llama.cpp reads."""
    return lambda name, config: [(f"{name}.weight", lambda t: t)] if name.endswith(ending) else None


def _gemma4_moe(name: str, config: dict):
    """Gemma 4's sparse block under the names llama.cpp's gemma4 reads: the fused experts (gate_up_proj [experts,
    2·inter, hidden], gate rows first, and down_proj, as llama.cpp's own fused layout) as they are, with the
    `.weight` suffix transformers' parameters lack; the router input's scale as the router's (`ffn_gate_inp.scale`),
    the per-expert output scale as the experts' down projection's (`ffn_down_exps.scale`)."""
    renamed = {
        ".experts.gate_up_proj": ".experts.gate_up_proj.weight",
        ".experts.down_proj": ".experts.down_proj.weight",
        ".router.scale": ".router.proj.scale",
        ".router.per_expert_scale": ".experts.down_proj.scale",
    }
    for ending, into in renamed.items():
        if name.endswith(ending):
            return [(name.removesuffix(ending) + into, lambda t: t)]
    return None


def _tiled(t, dim: int, k_heads: int, per_k: int, size: int):
    """Value heads along `dim` from grouped by key head [k0: v0..v(r-1), k1: ...] to tiled [v0: k0, k1, ..., v1: ...],
    the order ggml's broadcast pairs them with the key heads in (llama.cpp's converter reorders them the same way)."""
    shape = list(t.shape)
    dim %= len(shape)
    grouped = t.reshape(*shape[:dim], k_heads, per_k, size, *shape[dim + 1 :])
    return grouped.transpose(dim, dim + 1).reshape(shape)


def _gated_deltanet(name: str, config: dict):
    """Qwen 3.5's linear-attention (Gated DeltaNet) tensors as llama.cpp's qwen35 reads them: A as -exp(A_log), the
    conv kernel without its singleton axis, dt_bias under the dt_proj name, and the value heads tiled."""
    import torch

    if ".linear_attn." not in name:
        return None
    k_heads, v_heads = config["linear_num_key_heads"], config["linear_num_value_heads"]
    key_dim, v_dim = config["linear_key_head_dim"] * k_heads, config["linear_value_head_dim"]

    def tiled(t, dim=0, size=v_dim):
        return _tiled(t, dim, k_heads, v_heads // k_heads, size)

    def qkv_rows(t):  # q and k rows as they are, the value rows tiled
        return torch.cat([t[: 2 * key_dim], tiled(t[2 * key_dim :])])

    forms = {
        "A_log": (name, lambda t: tiled(-torch.exp(t.float()), size=1)),
        "dt_bias": (name.replace(".dt_bias", ".dt_proj.bias"), lambda t: tiled(t, size=1)),
        "conv1d": (name, lambda t: qkv_rows(t.squeeze(1))),
        "in_proj_qkv": (name, qkv_rows),
        "in_proj_z": (name, tiled),
        "in_proj_a": (name, lambda t: tiled(t, size=1)),
        "in_proj_b": (name, lambda t: tiled(t, size=1)),
        "out_proj": (name, lambda t: tiled(t, dim=1)),
    }
    last = _module(name)
    return [forms[last]] if last in forms else None


def _module(name: str) -> str:
    """The last module of a tensor's name (`conv1d` of `...linear_attn.conv1d.weight`), or the parameter's own name
    where it has no `.weight`/`.bias` (`A_log`)."""
    return name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name.rsplit(".", 1)[-1]


def _fused_deltanet(name: str, config: dict):
    """Qwen3-Next's linear-attention (Gated DeltaNet) tensors as llama.cpp's qwen3next reads them: in_proj_qkvz, stored
    per key-head group [q k v z], split into the q, k and v rows by kind (attn_qkv) and the z rows (attn_gate); A as
    -exp(A_log), the conv kernel without its singleton axis, dt_bias under the dt_proj name. in_proj_ba stays fused
    and the value heads grouped by key head, as the checkpoint has them."""
    import torch

    if ".linear_attn." not in name:
        return None
    k_heads, v_size = config["linear_num_key_heads"], config["linear_value_head_dim"] * config["linear_num_value_heads"]
    sizes = [config["linear_key_head_dim"]] * 2 + [v_size // k_heads] * 2

    def split(t):  # -> q, k, v, z, each [rows of every key head, hidden]
        groups = t.reshape(k_heads, sum(sizes), t.shape[-1]).split(sizes, dim=1)
        return [part.reshape(-1, t.shape[-1]) for part in groups]

    forms = {
        "A_log": [(name, lambda t: -torch.exp(t.float()))],
        "dt_bias": [(name.replace(".dt_bias", ".dt_proj.bias"), lambda t: t)],
        "conv1d": [(name, lambda t: t.squeeze(1))],
        "in_proj_qkvz": [(name.replace("_qkvz", "_qkv"), lambda t: torch.cat(split(t)[:3])),
                         (name.replace("_qkvz", "_z"), lambda t: split(t)[3])],
    }  # fmt: skip
    return forms.get(_module(name))


def _no_mtp(name: str, config: dict):
    """Multi-token-prediction layers (DeepSeek's layers past num_hidden_layers, Qwen's `mtp.*`) left out, as llama.cpp's
    converter leaves them for these architectures (--no-mtp)."""
    if name.startswith(("mtp.", "model.mtp.")):
        return []
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and int(parts[2]) >= config["num_hidden_layers"]:
        return []
    return None


TRANSFORMS = {"mla_kv_b_split": _mla_kv_b_split,
              "gpt_oss_experts": lambda name, config: _fused_experts(name, interleaved=True),
              "llama4_experts": lambda name, config: _fused_experts(name, interleaved=False),
              "attention_sinks": _suffixless(".self_attn.sinks"), "gated_deltanet": _gated_deltanet,
              "fused_deltanet": _fused_deltanet, "no_mtp": _no_mtp,
              "layer_scalar": _suffixless(".layer_scalar"), "gemma4_moe": _gemma4_moe}  # fmt: skip


def pieces(arch: Architecture, name: str, config: dict) -> list[tuple[str, object]]:
    """A checkpoint tensor as the (name, function or None) pieces to map and write: itself unless a transform of
    the row takes it. A multimodal checkpoint's `language_model.` level is dropped first, as the converter does."""
    name = name.replace("language_model.", "")
    for transform in arch.row.gguf_transforms:
        found = TRANSFORMS[transform](name, config)
        if found is not None:
            return found
    return [(name, None)]


# --- checks: what llama.cpp computes that one config value cannot express --------------------------------------


def _gemma3_attention_scale(config: dict) -> str | None:
    """llama.cpp's gemma3 scales attention by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B);
    transformers by 1/sqrt(query_pre_attn_scalar)."""
    dim = head_dim(config)
    if config["num_hidden_layers"] == 62:
        dim = config["hidden_size"] // config["num_attention_heads"]
    scalar = config.get("query_pre_attn_scalar", dim)
    if scalar != dim:
        return (
            f"llama.cpp's gemma3 scales attention by 1/sqrt({dim}), this checkpoint by query_pre_attn_scalar {scalar}"
        )
    return None


def _qwen35_layers(config: dict) -> str | None:
    """llama.cpp's qwen35 takes every `full_attention_interval`-th layer as full attention and the rest as Gated
    DeltaNet (the qwen35 rows do not write the per-layer `recurrent_layers` list)."""
    interval = config.get("full_attention_interval", 4)
    expected = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(config["num_hidden_layers"])]  # fmt: skip
    if config.get("layer_types", expected) != expected:
        kinds = config["layer_types"]
        return f"llama.cpp's qwen35 needs every {interval}th layer full attention, this checkpoint has {kinds}"
    return None


def _deltanet_head_dims(config: dict) -> str | None:
    """llama.cpp's Gated DeltaNet (qwen3next, qwen35) has one head size for keys and values (its ssm state size)."""
    if config["linear_key_head_dim"] != config["linear_value_head_dim"]:
        return "llama.cpp's Gated DeltaNet needs linear_key_head_dim == linear_value_head_dim"
    return None


def _gemma4_rope(config: dict) -> str | None:
    """llama.cpp's gemma4 reads rope frequency factors on every global layer; llama.cpp's converter writes them for
    unscaled proportional rope only (and refuses other global rope)."""
    settings = (config.get("rope_parameters") or {}).get("full_attention") or {}
    if settings.get("rope_type") != "proportional":
        return (f"llama.cpp's converter writes Gemma 4's global layers with proportional rope only, this checkpoint "
                f"has {settings.get('rope_type')!r}")  # fmt: skip
    if settings.get("factor", 1.0) != 1.0:  # transformers divides the frequencies by it; no GGUF key says so here
        return f"Gemma 4's proportional rope is written unscaled, this checkpoint scales it by {settings['factor']}"
    return None


def _gemma4_per_layer_vocab(config: dict) -> str | None:
    """llama.cpp's gemma4 looks per-layer embeddings up by token over the whole vocabulary."""
    rows = config.get("vocab_size_per_layer_input", config["vocab_size"])
    if config.get("hidden_size_per_layer_input") and rows != config["vocab_size"]:
        return (f"llama.cpp's gemma4 needs a per-layer embedding row for every token, this checkpoint has "
                f"vocab_size_per_layer_input {rows} for vocab_size {config['vocab_size']}")  # fmt: skip
    return None


def _gemma4_kv_sharing(config: dict) -> str | None:
    """Layers that reuse another's KV cache: transformers takes the last earlier layer of the same kind, llama.cpp
    the last unshared layer (global) or the one before it (sliding); causal attention only."""
    if config.get("use_bidirectional_attention") == "all":
        return "llama.cpp's gemma4 attends causally, this checkpoint bidirectionally (use_bidirectional_attention: all)"
    shared = config.get("num_kv_shared_layers") or 0
    if not shared:
        return None
    kinds = config["layer_types"][: config["num_hidden_layers"] - shared]
    if kinds[-2:] != ["sliding_attention", "full_attention"]:
        return (f"llama.cpp's gemma4 shares the KV cache of the last two unshared layers (sliding, then global), "
                f"this checkpoint's are {kinds[-2:]}")  # fmt: skip
    return None


def _llama4_layers(config: dict) -> str | None:
    """llama.cpp's llama4 fixes what Llama 4's config spells out per layer: chunked attention on three layers of four
    and full attention without rope on every 4th, a sparse block every `interleave_moe_layer_step`-th layer, and q/k
    norms unless the model has 128 experts (it tells Scout from Maverick by the expert count)."""
    n, step = config["num_hidden_layers"], config["interleave_moe_layer_step"]
    expected = {
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "chunked_attention" for i in range(n)],
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(n)],
        "moe_layers": [i for i in range(n) if step > 0 and (i + 1) % step == 0],
        "use_qk_norm": config["num_local_experts"] != 128,
    }
    for key, value in expected.items():
        if config.get(key, value) != value:
            return f"llama.cpp's llama4 assumes {key}: {value}, this checkpoint has {config[key]}"
    return None


CHECKS = {"gemma3_attention_scale": _gemma3_attention_scale, "qwen35_layers": _qwen35_layers,
          "deltanet_head_dims": _deltanet_head_dims, "llama4_layers": _llama4_layers,
          "gemma4_rope": _gemma4_rope, "gemma4_per_layer_vocab": _gemma4_per_layer_vocab,
          "gemma4_kv_sharing": _gemma4_kv_sharing}  # fmt: skip


def check_config(arch: Architecture, config: dict) -> None:
    """FormatError where llama.cpp would compute something else than the checkpoint's model."""
    for key, value in arch.row.gguf_requires.items():
        if config.get(key, value) != value:
            raise FormatError(f"GGUF: llama.cpp's {arch.name} assumes {key}: {value!r}, this checkpoint has "
                              f"{config[key]!r}")  # fmt: skip
    for check in arch.row.gguf_checks:
        if why := CHECKS[check](config):
            raise FormatError(f"GGUF: {why}")
