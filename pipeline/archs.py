"""The architecture table: one row per Hugging Face `model_type`, holding what every format needs to know about it.

Adding an architecture is adding a row (and a tiny-checkpoint test). Where the field's own libraries already hold the
data, the row only names it: GGUF tensor names come from gguf-py's `TensorNameMap` for the row's `MODEL_ARCH` (the
names llama.cpp's own converter writes), MLX model code from mlx-lm's module of the same `model_type`. What no
library holds as data is spelled out here: the config keys llama.cpp's converter turns into GGUF metadata beyond the
common ones, whether q/k rows are permuted for llama.cpp's rope, which linears our GPTQ layer stream quantizes and
where a mixture of experts keeps its experts (checkpoint names, transformers' fused module).

`matrix()` renders the architecture x format table that the README shows (tests check that the two agree).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# GGUFWriter method -> Hugging Face config keys, first one present wins (rope keys may sit in `rope_parameters`); a
# trailing non-string value is the default when no key is present. What llama.cpp's converter writes for every
# text model (`TextModel.set_gguf_parameters`).
COMMON_HPARAMS: dict[str, tuple] = {
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
    "add_expert_count": ("num_local_experts", "num_experts", "n_routed_experts"),
    "add_expert_used_count": ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"),
}

# The linears of a Llama-style decoder layer, in the order the GPTQ layer stream quantizes them.
ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
SWIGLU = ("gate_proj", "up_proj", "down_proj")
MLP_LINEARS = tuple(f"mlp.{p}" for p in SWIGLU)
DENSE_LINEARS = (*ATTENTION_LINEARS, *MLP_LINEARS)
# Gated DeltaNet (Qwen 3.5): its projections to q/k/v, the output gate z and the output; the per-head decay and
# beta projections (in_proj_a/b, a few rows each) stay in float, as the conv kernel does
DELTANET_LINEARS = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj")
# a pre-norm decoder layer: q/k/v read input_layernorm's output, gate/up post_attention_layernorm's
PRE_NORMS = {"input_layernorm": ATTENTION_LINEARS[:3], "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


@dataclass(frozen=True)
class Experts:
    """Where a mixture-of-experts layer keeps its experts, for GPTQ. Checkpoints (and the GPTQ artifacts vLLM and
    GPTQModel load) hold one linear per expert and part, `{block}.experts.{e}.{gate|up|down}.weight`; transformers 5
    fuses them at load into `{module}.experts.gate_up_proj` [experts, 2·inter, hidden] (gate rows first) and
    `{module}.experts.down_proj` [experts, hidden, inter], the router being `{module}.gate`. gpt-oss's and Llama 4's
    checkpoints keep transformers' fused tensors instead (`fused`), which the artifact splits per expert."""

    block: str = "mlp"  # the checkpoint's name of the sparse block (Mixtral's original `block_sparse_moe`)
    gate: str = "gate_proj"  # the checkpoint's per-expert names of the three parts (Mixtral's w1, w3, w2)
    up: str = "up_proj"
    down: str = "down_proj"
    module: str = "mlp"  # transformers 5's attribute of the sparse block in the decoder layer
    # the checkpoint keeps transformers' fused tensors, `{block}.experts.gate_up_proj` [experts, in, 2·inter] and
    # `down_proj` [experts, inter, out], with `_bias` where the model has biases (gpt-oss, Llama 4); see `unfused`
    fused: bool = False

    @property
    def parts(self) -> dict[str, str]:
        """transformers' (and defuser's per-expert modules') part name -> the checkpoint's."""
        return {"gate_proj": self.gate, "up_proj": self.up, "down_proj": self.down}

    def name(self, expert: int, part: str) -> str:
        """The checkpoint name, within a decoder layer, of one expert's part (`gate_proj`, `up_proj`, `down_proj`)."""
        return f"{self.block}.experts.{expert}.{self.parts[part]}"

    def matches(self, name: str) -> bool:
        """Whether checkpoint tensor `name` is an expert linear's weight (fused: one of the two fused weights)."""
        if self.fused:
            return re.search(rf"\.{re.escape(self.block)}\.experts\.(gate_up_proj|down_proj)$", name) is not None
        parts = "|".join(re.escape(p) for p in self.parts.values())
        return re.search(rf"\.{re.escape(self.block)}\.experts\.\d+\.({parts})\.weight$", name) is not None

    def owns(self, name: str) -> bool:
        """Whether checkpoint tensor `name` is any of the experts' tensors, weights or biases: written per expert."""
        if self.fused:
            return self.matches(name.removesuffix("_bias"))
        return self.matches(re.sub(r"\.bias$", ".weight", name))

    def unfused(self, state: dict, expert: int) -> dict[str, tuple]:
        """One expert's gate_proj, up_proj and down_proj from a layer's tensors `state` (names within the layer), each
        as a linear's (weight [out, in], bias or None). Fused: gate_proj and up_proj are the two halves of
        gate_up_proj's output axis, as defuser splits it (GPTQModel's loader and ours run defuser). gpt-oss
        interleaves gate and up along that axis, so each half holds both; defuser's forward concatenates the halves
        back before gpt-oss's own activation, which de-interleaves them: the computation is the fused one."""
        if not self.fused:
            names = {part: self.name(expert, part) for part in self.parts}
            return {part: (state[f"{n}.weight"], state.get(f"{n}.bias")) for part, n in names.items()}
        fused = f"{self.block}.experts."
        gate_up, down = state[f"{fused}gate_up_proj"][expert].T, state[f"{fused}down_proj"][expert].T
        bias = state.get(f"{fused}gate_up_proj_bias")
        halves = [None, None] if bias is None else bias[expert].chunk(2)
        down_bias = state.get(f"{fused}down_proj_bias")
        return {"gate_proj": (gate_up.chunk(2)[0], halves[0]), "up_proj": (gate_up.chunk(2)[1], halves[1]),
                "down_proj": (down, None if down_bias is None else down_bias[expert])}  # fmt: skip


@dataclass(frozen=True)
class MlxTensors:
    """A rewrite of checkpoint tensors into the layout mlx-lm's module loads, where it differs from what transformers
    saves (mlx-lm's `sanitize` handles the layouts of the original releases, not always transformers 5's). Each
    tensor whose name matches `pattern` (a regular expression) becomes the pieces named by `into` (`re.sub`
    templates): the whole tensor (one name), or its halves / interleaved rows along `axis` (two names); `transpose`
    then swaps each piece's last two axes (transformers' fused experts are [experts, in, out], MLX's [experts, out,
    in]). A pattern with a group named `expert` stacks the per-expert tensors it matches, in expert order, into one
    [experts, ...] tensor named by `into` (mlx-lm's SwitchGLU)."""

    pattern: str
    into: tuple[str, ...]
    split: str = ""  # "", "halves" or "interleaved"
    axis: int = -1
    transpose: bool = False


# one linear per expert, as transformers 5 saves most MoE checkpoints -> mlx-lm's SwitchGLU, [experts, out, in]
STACK_EXPERTS = MlxTensors(r"^(.*\.mlp)\.experts\.(?P<expert>\d+)\.(\w+)\.weight$", (r"\1.switch_mlp.\3.weight",))


@dataclass(frozen=True)
class Arch:
    """What the formats need to know about one `model_type`. A field left at its default means "not supported"."""

    gguf: str | None = None  # gguf-py MODEL_ARCH member (llama.cpp's architecture); None: no GGUF
    gguf_hparams: dict[str, tuple] = field(default_factory=dict)  # metadata beyond COMMON_HPARAMS
    permute_qk: bool = False  # llama.cpp's `llama`-style rope rotates interleaved pairs: permute q/k rows
    norm_offset: float = 0.0  # RMSNorm weights stored as an offset from 1 (Gemma)
    gguf_skip: tuple[str, ...] = ()  # checkpoint tensors llama.cpp does not read (a tied lm_head ...)
    gguf_requires: dict[str, Any] = field(default_factory=dict)  # config values llama.cpp's architecture assumes
    gguf_refused: str = ""  # why a known architecture has no GGUF yet (the refusal says it)
    gguf_checks: tuple[str, ...] = ()  # named checks of `gguf_arch.CHECKS`, for what one config value cannot say
    gguf_transforms: tuple[str, ...] = ()  # named tensor transforms of `gguf_arch.TRANSFORMS` (splits, reorders)
    norm_offset_except: tuple[str, ...] = ()  # GGUF norms that hold their weight as is although `norm_offset` is set
    mlx: bool = False  # mlx-lm has a module for it (and loads the checkpoint, rewritten by `mlx_tensors`)
    mlx_module: str | None = None  # mlx-lm's module, where it is not named by the model_type
    mlx_text_config: bool = False  # mlx-lm's module reads a multimodal config: text under `text_config` and
    # weights under `language_model.`
    mlx_tensors: tuple[MlxTensors, ...] = ()  # rewrites into mlx-lm's layout, the first matching one applies
    mlx_requires: dict[str, Any] = field(default_factory=dict)  # config values mlx-lm's module assumes
    # linears of a decoder layer that GPTQ quantizes (empty: no GPTQ); a hybrid's layers each hold some of them. The
    # layer walker takes each layer's inputs from the model's own forward (embedding scales, per-layer-type rope and
    # masks, per-layer inputs), so a row needs nothing else unless its experts are stored fused
    gptq_linears: tuple[str, ...] = ()
    gptq_experts: Experts | None = None  # a mixture of experts: every expert's linears quantized too
    gptq_refused: str = ""  # why a known architecture has no GPTQ (the refusal says it)
    compressed: bool = False  # compressed-tensors w8a8/fp8/nvfp4 (dense rows whose linears are all quantized)
    # the streamed reference (`pipeline.reference_stream`) computes it exactly: its walker passes no embedding
    # scales, masks or per-layer inputs, so only Llama-style rows
    stream_reference: bool = False
    # norm -> the linears that read its output, where SmoothQuant's input scales fold into the norm (W8A8)
    smooth_norms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    onnx_export: bool = False  # our torch export with the KV cache as inputs/outputs handles it
    onnx_genai: bool = False  # onnxruntime-genai's model builder handles it
    trtllm: str | None = None  # TensorRT-LLM checkpoint architecture (the legacy engine route, `format: tensorrt`)
    trtllm_torch: bool = False  # TensorRT-LLM's PyTorch backend has a model for it (`format: trtllm`)
    moe: bool = False
    features: tuple[str, ...] = ()  # what sets it apart, for the README matrix

    @property
    def gptq(self) -> bool:
        return bool(self.gptq_linears)


LLAMA = Arch(
    gguf="LLAMA",
    gguf_hparams={"add_vocab_size": ("vocab_size",), "add_rope_dimension_count": ("rope_dimensions",)},
    permute_qk=True,
    mlx=True,
    gptq_linears=DENSE_LINEARS,
    compressed=True,
    stream_reference=True,
    smooth_norms=PRE_NORMS,
    onnx_export=True,
    onnx_genai=True,
    trtllm="LlamaForCausalLM",
    trtllm_torch=True,
)

# the Gated DeltaNet's metadata in llama.cpp's qwen3next and its Qwen 3.5 successors
DELTANET_HPARAMS = {
    "add_ssm_conv_kernel": ("linear_conv_kernel_dim",),
    "add_ssm_state_size": ("linear_key_head_dim",),
    "add_ssm_group_count": ("linear_num_key_heads",),
    "add_ssm_time_step_rank": ("linear_num_value_heads",),
    "add_ssm_inner_size": ("ssm_inner_size",),
    "add_full_attention_interval": ("full_attention_interval", 4),
}
SHARED_EXPERT_HPARAMS = {
    "add_expert_feed_forward_length": ("moe_intermediate_size",),
    "add_expert_shared_feed_forward_length": ("shared_expert_intermediate_size",),
}

# Qwen 3.5's language model (what transformers' Qwen3_5ForCausalLM saves): three Gated DeltaNet layers to one of
# gated full attention; llama.cpp's qwen35, without the MTP layer (llama.cpp's converter's --no-mtp)
QWEN35_TEXT = Arch(
    gguf="QWEN35",
    gguf_hparams={
        **DELTANET_HPARAMS,
        "add_rope_dimension_count": ("rope_dimensions",),
        "add_rope_dimension_sections": ("mrope_sections",),
    },
    norm_offset=1.0,  # Qwen 3.5's RMSNorm is Gemma's, 1 + weight; not the gated norm of the DeltaNet
    norm_offset_except=("ssm_norm.weight",),
    gguf_checks=("qwen35_layers", "deltanet_head_dims"),
    gguf_transforms=("no_mtp", "gated_deltanet"),
    gptq_linears=(*ATTENTION_LINEARS, *DELTANET_LINEARS, *MLP_LINEARS),
    features=("hybrid: Gated DeltaNet + full attention",),
)

# its mixture-of-experts sibling: every layer sparse, with a gated shared expert (llama.cpp's qwen35moe)
QWEN35_MOE_TEXT = Arch(
    **{
        **QWEN35_TEXT.__dict__,
        "gguf": "QWEN35MOE",
        "gguf_hparams": {**QWEN35_TEXT.gguf_hparams, **SHARED_EXPERT_HPARAMS},
        # the shared expert quantized like the routed ones; its one-row gate stays in float
        "gptq_linears": (*ATTENTION_LINEARS, *DELTANET_LINEARS, *(f"mlp.shared_expert.{p}" for p in SWIGLU)),
        "gptq_experts": Experts(),
        "moe": True,
    }
)

# what the released (multimodal) Qwen 3.5 checkpoints change in their text rows: GGUF leaves the vision tower out
# (GPTQ walks the language model, `model.language_model.*`, and keeps the vision tower in float16)
MULTIMODAL = {"gguf_skip": ("model.visual.",)}

ARCHS: dict[str, Arch] = {
    "llama": LLAMA,
    "mistral": Arch(**{**LLAMA.__dict__, "trtllm": None}),  # llama.cpp runs Mistral (dense) as llama
    "qwen2": Arch(
        gguf="QWEN2",
        mlx=True,
        gptq_linears=DENSE_LINEARS,
        compressed=True,
        stream_reference=True,
        smooth_norms=PRE_NORMS,
        onnx_export=True,
        onnx_genai=True,
        trtllm="Qwen2ForCausalLM",
        trtllm_torch=True,
        features=("qkv bias",),
    ),  # fmt: skip
    "qwen3": Arch(
        gguf="QWEN3",
        mlx=True,
        gptq_linears=DENSE_LINEARS,
        compressed=True,
        stream_reference=True,
        smooth_norms=PRE_NORMS,
        onnx_export=True,
        onnx_genai=True,
        trtllm_torch=True,
        features=("q/k norm",),
    ),  # fmt: skip
    "gemma2": Arch(
        gguf="GEMMA2",
        gguf_hparams={
            "add_attn_logit_softcapping": ("attn_logit_softcapping",),
            "add_final_logit_softcapping": ("final_logit_softcapping",),
            "add_sliding_window": ("sliding_window",),
        },
        norm_offset=1.0,
        gguf_skip=("lm_head.weight",),  # tied; llama.cpp uses the embeddings
        mlx=True,
        gptq_linears=DENSE_LINEARS,
        onnx_export=True,
        onnx_genai=True,
        features=("sliding window", "soft-capping"),
    ),
    "phi3": Arch(
        gguf="PHI3",
        gguf_hparams={
            "add_rope_dimension_count": ("rope_dimensions",),
            "add_rope_scaling_orig_ctx_len": ("original_max_position_embeddings", "max_position_embeddings"),
            "add_sliding_window": ("sliding_window", 0),
        },
        mlx=True,
        gptq_linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
        onnx_export=True,
        onnx_genai=True,
        trtllm_torch=True,
        features=("fused qkv", "fused gate/up"),
    ),
    "olmo2": Arch(
        gguf="OLMO2",
        mlx=True,
        gptq_linears=DENSE_LINEARS,
        compressed=True,
        stream_reference=True,
        onnx_export=True,
        features=("q/k norm", "post-norm"),
    ),
    # llama.cpp's smollm3 leaves out rope on every 4th layer, as SmolLM3's default config does
    "smollm3": Arch(
        **{
            **LLAMA.__dict__,
            "gguf": "SMOLLM3",
            "gguf_requires": {"no_rope_layer_interval": 4},
            "onnx_export": True,
            "onnx_genai": False,
            "trtllm": None,
            "trtllm_torch": False,
            "features": ("no rope on every 4th layer",),
        }
    ),  # fmt: skip
    "qwen3_moe": Arch(
        gguf="QWEN3MOE",
        gguf_hparams={"add_expert_feed_forward_length": ("moe_intermediate_size",)},
        # llama.cpp's qwen3moe: every layer sparse, top-k weights renormalised
        gguf_requires={"norm_topk_prob": True, "mlp_only_layers": [], "decoder_sparse_step": 1},
        mlx=True,
        gptq_linears=ATTENTION_LINEARS,
        gptq_experts=Experts(),
        stream_reference=True,
        trtllm_torch=True,
        moe=True,
        features=("q/k norm",),
    ),
    # Mixtral's checkpoints (and vLLM's loader) keep the original names: block_sparse_moe, w1 (gate), w3 (up), w2 (down)
    "mixtral": Arch(
        **{
            **LLAMA.__dict__,
            "gptq_linears": ATTENTION_LINEARS,
            "smooth_norms": {},  # experts read post_attention_layernorm's output through the router
            "compressed": False,
            "onnx_export": False,
            "onnx_genai": False,
            "trtllm": None,
            "moe": True,
            "gptq_experts": Experts(block="block_sparse_moe", gate="w1", up="w3", down="w2"),
        }
    ),  # fmt: skip
    "granite": Arch(
        gguf="GRANITE",
        gguf_hparams={
            "add_attention_scale": ("attention_multiplier",),
            "add_embedding_scale": ("embedding_multiplier",),
            "add_residual_scale": ("residual_multiplier",),
            "add_logit_scale": ("logits_scaling",),
        },
        permute_qk=True,
        mlx=True,
        gptq_linears=DENSE_LINEARS,
        onnx_export=True,
        onnx_genai=True,
        features=("multipliers",),
    ),
    # the families of late 2026 (a row without a format is known, and refused by every target with its reason).
    # The released Qwen 3.5 checkpoints: the language model inside a multimodal one, its vision tower left out (by
    # our GGUF writer, and by the `sanitize` of mlx-lm's qwen3_5 modules, which read both forms)
    "qwen3_5": Arch(**{**QWEN35_TEXT.__dict__, **MULTIMODAL, "mlx": True}),
    "qwen3_5_text": Arch(**{**QWEN35_TEXT.__dict__, "mlx": True, "mlx_module": "qwen3_5"}),
    # mlx-lm's qwen3_5_moe stacks the fused `experts.gate_up_proj` of the original release; transformers 5 saves one
    # linear per expert
    "qwen3_5_moe_text": Arch(
        **{**QWEN35_MOE_TEXT.__dict__, "mlx": True, "mlx_module": "qwen3_5_moe", "mlx_tensors": (STACK_EXPERTS,)}
    ),  # fmt: skip
    "qwen3_5_moe": Arch(**{**QWEN35_MOE_TEXT.__dict__, **MULTIMODAL, "mlx": True, "mlx_tensors": (STACK_EXPERTS,)}),
    # llama.cpp's qwen3next, without the MTP layer (--no-mtp): Qwen 3.5's predecessor, its DeltaNet projections fused
    # (in_proj_qkvz split on the way, in_proj_ba kept), value heads grouped by key head as the checkpoint has them,
    # every layer sparse with top-k weights renormalised, and the layer kinds written per layer
    "qwen3_next": Arch(
        mlx=True,
        gguf="QWEN3NEXT",
        gguf_hparams={
            **DELTANET_HPARAMS,
            "add_recurrent_layers": ("recurrent_layers",),
            "add_rope_dimension_count": ("qwen3_next_rope_dimensions",),
            **SHARED_EXPERT_HPARAMS,
        },
        gguf_requires={"norm_topk_prob": True, "mlp_only_layers": [], "decoder_sparse_step": 1},
        norm_offset=1.0,  # 1 + weight, as in Qwen 3.5; not the gated norm of the DeltaNet
        norm_offset_except=("ssm_norm.weight",),
        gguf_checks=("deltanet_head_dims",),
        gguf_transforms=("no_mtp", "fused_deltanet"),
        gptq_linears=(
            *ATTENTION_LINEARS,
            "linear_attn.in_proj_qkvz",
            "linear_attn.out_proj",
            *(f"mlp.shared_expert.{p}" for p in SWIGLU),
        ),  # in_proj_ba and the shared expert's gate: float
        gptq_experts=Experts(),
        moe=True,
        features=("hybrid: Gated DeltaNet + full attention", "shared expert"),
    ),
    # Gemma 3: sliding and global layers (the checkpoint's `layer_types`, written per layer), two rope bases, q/k norms
    "gemma3_text": Arch(
        mlx=True,
        gguf="GEMMA3",
        gguf_hparams={
            "add_rope_freq_base_swa": ("rope_theta_swa",),
            "add_final_logit_softcapping": ("final_logit_softcapping",),
            "add_sliding_window": ("sliding_window",),
            "add_sliding_window_pattern": ("sliding_layers",),
        },
        norm_offset=1.0,
        gguf_skip=("lm_head.weight",),  # tied; llama.cpp uses the embeddings
        gguf_requires={"attn_logit_softcapping": None, "use_bidirectional_attention": False},
        gguf_checks=("gemma3_attention_scale",),
        gptq_linears=DENSE_LINEARS,
        onnx_export=True,
        features=("sliding/global attention", "two rope bases"),
    ),
    # Gemma 4 (llama.cpp's gemma4, dense): global layers with their own head size and proportional rope (the rope
    # frequency factors generated), per-layer embeddings, a per-layer output scale; RMSNorm weights used as they are
    "gemma4_text": Arch(
        mlx=True,
        gguf="GEMMA4",
        gguf_hparams={
            "add_feed_forward_length": ("gemma4_feed_forward_lengths", "intermediate_size"),
            "add_head_count_kv": ("gemma4_head_count_kv", "num_key_value_heads"),
            "add_key_length": ("global_head_dim",),
            "add_value_length": ("global_head_dim",),
            "add_key_length_swa": ("head_dim",),
            "add_value_length_swa": ("head_dim",),
            "add_rope_dimension_count": ("global_head_dim",),
            "add_rope_dimension_count_swa": ("swa_rope_dimensions",),
            "add_rope_freq_base_swa": ("rope_theta_swa",),
            # llama.cpp's gemma4 caps at 30 where the file has no cap: 0 turns it off (the converter writes none)
            "add_final_logit_softcapping": ("final_logit_softcapping", 0.0),
            "add_sliding_window": ("sliding_window",),
            "add_sliding_window_pattern": ("sliding_layers",),
            "add_shared_kv_layers": ("num_kv_shared_layers", 0),
            "add_embedding_length_per_layer_input": ("hidden_size_per_layer_input", 0),
            "add_expert_feed_forward_length": ("moe_intermediate_size",),  # the MoE variant's
        },
        gguf_skip=("lm_head.weight",),  # tied; llama.cpp uses the embeddings
        gguf_requires={"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False},
        gguf_checks=("gemma4_rope", "gemma4_per_layer_vocab", "gemma4_kv_sharing"),
        gguf_transforms=("layer_scalar", "gemma4_moe"),
        gptq_linears=DENSE_LINEARS,  # the per-layer input gate and projection stay in float; MoE variants refused
        features=("per-layer embeddings",),
    ),
    # llama.cpp's gpt-oss: experts fused and gate/up interleaved in the checkpoint, split and transposed on the way;
    # its SwiGLU clamps at 7, as the released models do
    # transformers keeps gpt-oss's experts fused, [experts, in, out], gate and up rows interleaved; mlx-lm's sanitize
    # reads the original release's MXFP4 blocks, so the rewrite gives it its own layout (which it loads as is)
    "gpt_oss": Arch(
        mlx=True,
        mlx_tensors=(
            MlxTensors(
                r"^(.*)\.gate_up_proj$", (r"\1.gate_proj.weight", r"\1.up_proj.weight"), "interleaved", -1, True
            ),
            MlxTensors(r"^(.*)\.gate_up_proj_bias$", (r"\1.gate_proj.bias", r"\1.up_proj.bias"), "interleaved", -1),
            MlxTensors(r"^(.*\.experts)\.down_proj$", (r"\1.down_proj.weight",), transpose=True),
            MlxTensors(r"^(.*\.experts)\.down_proj_bias$", (r"\1.down_proj.bias",)),
        ),
        gguf="GPT_OSS",
        gguf_hparams={
            "add_sliding_window": ("sliding_window",),
            "add_sliding_window_pattern": ("sliding_layers",),
            "add_expert_feed_forward_length": ("intermediate_size",),
        },
        gguf_requires={"swiglu_limit": 7.0},
        gguf_transforms=("gpt_oss_experts", "attention_sinks"),
        # GPTQ: each expert's three linears written as GPTQModel writes gpt-oss (defuser's split: see Experts.unfused),
        # with their biases; the router and the attention sinks stay in float
        gptq_linears=ATTENTION_LINEARS,
        gptq_experts=Experts(fused=True),
        moe=True,
        features=("attention sinks", "MXFP4 experts"),
    ),  # fmt: skip
    # llama.cpp's deepseek2: multi-head latent attention as MQA over the latent (kv_b split into k_b and v_b),
    # sigmoid routing with a score-correction bias, shared experts, the first layers dense
    "deepseek_v3": Arch(
        mlx=True,
        gguf="DEEPSEEK2",
        gguf_hparams={
            "add_head_count_kv": (1,),
            "add_key_length": ("mla_key_length",),
            "add_value_length": ("kv_lora_rank",),
            "add_key_length_mla": ("mla_key_length_mha",),
            "add_value_length_mla": ("v_head_dim",),
            "add_leading_dense_block_count": ("first_k_dense_replace", 0),
            "add_vocab_size": ("vocab_size",),
            "add_q_lora_rank": ("q_lora_rank",),
            "add_kv_lora_rank": ("kv_lora_rank",),
            "add_expert_feed_forward_length": ("moe_intermediate_size",),
            "add_expert_shared_count": ("n_shared_experts", 0),
            "add_expert_weights_scale": ("routed_scaling_factor",),
            "add_expert_weights_norm": ("norm_topk_prob_if_set",),
            "add_expert_gating_func": (
                "sigmoid_routing",
            ),  # transformers' DeepSeek-V3 router, whatever the config says
            "add_expert_group_count": ("n_group",),
            "add_expert_group_used_count": ("topk_group",),
            "add_rope_dimension_count": ("qk_rope_head_dim",),
            "add_rope_scaling_yarn_log_mul": ("deepseek_yarn_log_mul",),
        },
        gguf_requires={"rope_interleave": True},  # q/k rope dims stored interleaved, as llama.cpp rotates them
        gguf_transforms=("no_mtp", "mla_kv_b_split"),
        gptq_linears=(
            *(
                f"self_attn.{p}"
                for p in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
            ),
            *MLP_LINEARS,
            *(f"mlp.shared_experts.{p}" for p in SWIGLU),
        ),  # the first layers are dense
        gptq_experts=Experts(),
        moe=True,
        features=("multi-head latent attention", "shared experts"),
    ),
    # mlx-lm's llama4_text module is a dense model; Llama 4's experts are in its multimodal `llama4` module, whose
    # sanitize splits transformers' fused experts itself
    "llama4_text": Arch(
        mlx=True,
        mlx_module="llama4",
        mlx_text_config=True,
        mlx_requires={"num_experts_per_tok": 1, "no_rope_layer_interval": 4},  # hard-coded in mlx-lm's llama4
        # llama.cpp's llama4: experts split from transformers' fused tensors (gate half first), q/k rows as they are
        # (Llama 4's rope already rotates interleaved pairs), and chunked attention of 8192 tokens, temperature
        # tuning and the layer pattern fixed in its loader rather than read from the file
        gguf="LLAMA4",
        gguf_hparams={
            "add_feed_forward_length": ("intermediate_size_mlp",),  # the dense layers'
            "add_expert_feed_forward_length": ("intermediate_size",),
            "add_interleave_moe_layer_step": ("interleave_moe_layer_step",),
            "add_vocab_size": ("vocab_size",),
            "add_rope_dimension_count": ("rope_dimensions",),
        },
        gguf_requires={
            "attention_chunk_size": 8192,
            "attn_temperature_tuning": True,
            "floor_scale": 8192,
            "attn_scale": 0.1,
        },  # fmt: skip
        gguf_checks=("llama4_layers",),
        gguf_transforms=("llama4_experts",),
        # GPTQ: the experts written per expert as GPTQModel writes Llama 4 (defuser's split of gate_up_proj, gate
        # first), each calibrated on its tokens as the model feeds them (scaled by the router's sigmoid score); the
        # dense layers' MLP and the shared expert as a dense MLP (the shared expert float16 unless asked); the
        # router stays float16
        gptq_linears=(
            *ATTENTION_LINEARS,
            *(f"feed_forward.{p}" for p in SWIGLU),
            *(f"feed_forward.shared_expert.{p}" for p in SWIGLU),
        ),
        gptq_experts=Experts(block="feed_forward", module="feed_forward", fused=True),
        moe=True,
        features=("MoE and dense layers", "chunked attention"),
    ),
}


def arch(model_type: str) -> Arch:
    """The row of `model_type`; an empty row (nothing supported) for one the table does not know."""
    return ARCHS.get(model_type, Arch())


def supported(attribute: str) -> list[str]:
    """The model types whose row supports `attribute` (a field of Arch that is truthy when supported)."""
    return sorted(m for m, row in ARCHS.items() if getattr(row, attribute))


MATRIX_COLUMNS = {"GGUF": "gguf", "MLX": "mlx", "GPTQ": "gptq", "compressed-tensors": "compressed",
                  "ONNX standard": "onnx_export",
                  "ONNX genai": "onnx_genai", "TensorRT-LLM": "trtllm_torch", "TensorRT engine": "trtllm"}  # fmt: skip


def matrix() -> str:
    """The architecture x format table, as the README shows it (markdown)."""
    heads = ["model_type", *MATRIX_COLUMNS, "notes"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for model_type, row in ARCHS.items():
        cells = ["yes" if getattr(row, attribute) else "-" for attribute in MATRIX_COLUMNS.values()]
        notes = ", ".join((("MoE",) if row.moe else ()) + row.features) or "-"
        lines.append("| " + " | ".join([f"`{model_type}`", *cells, notes]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(matrix())
