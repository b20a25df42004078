"""TensorRT-LLM: a checkpoint prepared on any machine; the engine built and smoke-tested on a CUDA worker.

Three steps, each with its own status in the manifest (`steps`):

1. prepare (the format's `build`, CPU): the TensorRT-LLM checkpoint (`config.json` + `rank0.safetensors`, tp=1)
   for the rows of `pipeline.archs` with a `trtllm` architecture, written by our own small converter from the tensor
   map below. TensorRT-LLM's converters
   need `import tensorrt_llm`, which needs the NVIDIA driver: they cannot run on the CPU machines that prepare
   artifacts. Quants: `fp16`/`bf16`; weight-only `w8a16`/`w4a16` (symmetric, per output channel, as TensorRT-LLM's
   own weight-only quantizer); `w4a16_gptq` from this recipe's GPTQ artifact (option `gptq_target`).
   The smoke step validates the checkpoint on any machine: it maps the checkpoint back into a transformers model
   (dequantizing) and measures it against the source like every other artifact.
2. engine build (CUDA worker): with TensorRT-LLM 1.2.x (the last line that builds TensorRT engines) from this
   checkpoint, see `pipeline.formats.tensorrt_engine`; with only TensorRT, the plain route from the recipe's fp16
   standard ONNX export (option `onnx_target`), see `pipeline.formats.tensorrt_plain`.
3. engine smoke (same worker): the engine against the source model on the same GPU (TensorRT-LLM's runtime, or our
   ONNX decode loop over a TensorRT execution context).

Where steps 2-3 cannot run the target is `not_run` with a reason code (`no_cuda_device`, `tensorrt_llm_not_installed`,
`tensorrt_not_installed`, `tensorrt_llm_version_mismatch`, `tensorrt_version_mismatch`, ...) after the checkpoint
itself has been validated; no engine file is written.

Weight-only tensors are stored in TensorRT-LLM's unprocessed layout: `weight` int8 [in, out] (int4: two values a
byte along `out`, low nibble first, as `pack_int8_tensor_to_packed_int4` packs them) and `per_channel_scale`
[out]; GPTQ adds `weights_scaling_factor` [groups, out] and `zero` (= (8 - zero level) · scale) [groups, out].
TensorRT-LLM's kernels want these interleaved for the GPU's architecture (`preprocess_weights_for_mixed_gemm`),
which only exists with TensorRT-LLM installed: the engine build applies it on the worker, so one prepared
checkpoint serves every GPU. `config.json` says so under `weightsmith.weight_layout`.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pipeline import handoff
from pipeline.archs import arch
from pipeline.checkpoint import Checkpoint
from pipeline.formats.base import BuildContext, Format, refuse_unless
from pipeline.formats.base import Options as BaseOptions
from pipeline.resources import ModelSize, Needs
from pipeline.types import Calibration, FormatError, Manifest, SourceInfo, Step, Validation

QUANT_ALGO = {"fp16": None, "bf16": None, "w8a16": "W8A16", "w4a16": "W4A16", "w4a16_gptq": "W4A16_GPTQ"}
WEIGHT_BITS = {"w8a16": 8, "w4a16": 4, "w4a16_gptq": 4}

# TensorRT-LLM linear: the HF linears concatenated along the output dimension to make it
LINEARS = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}
NORMS = {"input_layernorm": "input_layernorm", "post_layernorm": "post_attention_layernorm"}
TOP = {
    "transformer.vocab_embedding.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
}


class Options(BaseOptions):
    """Target options for TensorRT-LLM."""

    gptq_target: str = "gptq/int4"  # w4a16_gptq: the recipe's GPTQ target whose artifact is converted
    # which engine builder: TensorRT-LLM from the checkpoint, or plain TensorRT from onnx_target's graph; auto takes
    # TensorRT-LLM where it is installed, else plain TensorRT when onnx_target is set
    engine_route: Literal["auto", "tensorrt_llm", "onnx"] = "auto"
    onnx_target: str | None = None  # fp16: the recipe's standard fp16 ONNX target (`onnx/fp16`) for plain TensorRT
    tensorrt_llm: str = "1.2"  # the TensorRT-LLM version (prefix) the engine must be built with
    tensorrt: str = "10"  # the TensorRT version (prefix) the plain route must build with
    max_batch_size: int = 1
    max_input_len: int = 1024
    max_seq_len: int = 2048
    gemm_plugin: Literal["auto", "disable"] = "auto"


class CheckpointConfig(BaseModel):
    """config.json of a TensorRT-LLM checkpoint: the fields of TensorRT-LLM's checkpoint documentation
    (docs/source/architecture/checkpoint.md) and its llama/qwen configs that a decoder like ours sets."""

    model_config = ConfigDict(extra="allow")

    architecture: str
    dtype: Literal["float16", "bfloat16", "float32"]
    logits_dtype: str = "float32"
    vocab_size: int
    max_position_embeddings: int | None
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    hidden_act: str
    intermediate_size: int
    norm_epsilon: float
    position_embedding_type: Literal["rope_gpt_neox"]
    rotary_base: float
    rotary_scaling: dict | None
    mapping: dict[str, int]
    quantization: dict[str, Any]
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    share_embedding_table: bool = False
    attn_bias: bool
    mlp_bias: bool = False
    qwen_type: str | None = None


def checkpoint_config(hf: dict, quant: str, group_size: int | None) -> CheckpointConfig:
    rope = hf.get("rope_parameters") or {}
    heads = hf["num_attention_heads"]
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"}
                                         if rope.get("rope_type", "default") != "default" else None)  # fmt: skip
    return CheckpointConfig(
        architecture=arch(hf["model_type"]).trtllm,
        dtype="bfloat16" if quant == "bf16" else "float16",
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings"),
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_size=hf.get("head_dim") or hf["hidden_size"] // heads,
        hidden_act=hf["hidden_act"],
        intermediate_size=hf["intermediate_size"],
        norm_epsilon=hf["rms_norm_eps"],
        position_embedding_type="rope_gpt_neox",
        rotary_base=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rotary_scaling=scaling,
        mapping={"world_size": 1, "tp_size": 1, "pp_size": 1},
        quantization={
            "quant_algo": QUANT_ALGO[quant],
            "kv_cache_quant_algo": None,
            "group_size": group_size or 128,
            "has_zero_point": quant == "w4a16_gptq",
            "pre_quant_scale": False,
            "exclude_modules": ["lm_head"],
        },  # fmt: skip
        attn_bias=hf["model_type"] == "qwen2" or bool(hf.get("attention_bias")),
        qwen_type="qwen2" if hf["model_type"] == "qwen2" else None,
        share_embedding_table=False,  # lm_head is written out even when tied: every builder path finds it
        tie_word_embeddings=bool(hf.get("tie_word_embeddings")),
    )


def linear_tensors(weight, prefix: str, quant: str, dtype) -> dict[str, Any]:
    """One linear's tensors: the weight [out, in] as is, or weight-only quantized."""
    if quant not in ("w8a16", "w4a16"):
        return {f"{prefix}.weight": weight}
    q, scale = weight_only(weight, WEIGHT_BITS[quant])
    packed = q.T.contiguous() if quant == "w8a16" else pack_int4(q.T.contiguous())
    return {f"{prefix}.weight": packed, f"{prefix}.per_channel_scale": scale.to(dtype)}


def weight_only(weight, bits: int):
    """Symmetric per-output-channel quantization as TensorRT-LLM's weight-only quantizer does it: scale =
    max|w| / (2^(bits-1) - 1) (here rounded to float16 first, the precision it is stored in), levels rounded and
    clamped to the signed range. Returns (int8 [out, in], scale [out])."""
    import torch

    w = weight.float()
    top = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=1) / top).half().float()  # rounded as stored, so dequantization is exact
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / scale[:, None]), -top - 1, top).to(torch.int8)
    return q, scale


def pack_int4(values):
    """int8 values in [-8, 7], [rows, cols] -> int8 [rows, cols / 2], two a byte along cols, low nibble first."""
    import torch

    v = values.to(torch.int16)
    low, high = v[:, 0::2] & 0xF, v[:, 1::2] & 0xF
    return ((high << 4) | low).to(torch.uint8).view(torch.int8)


def unpack_int4(packed):
    import torch

    b = packed.view(torch.uint8).to(torch.int16)
    values = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    return torch.where(values > 7, values - 16, values).to(torch.int8)


def gptq_artifact(path: Path, key: str) -> dict[str, Any]:
    """The validated GPTQ artifact at `path` (target `key`) and its quantization config, if TensorRT-LLM takes it."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    if config["bits"] != 4:
        raise FormatError(f"{key} is a {config['bits']}-bit GPTQ artifact; w4a16_gptq needs 4 bits")
    if config["desc_act"]:  # groups scattered by act-order (see pipeline.formats.gptq.quantization_config)
        raise FormatError(f"{key} uses act-order without static_groups: TensorRT-LLM's GPTQ kernels take no g_idx; "
                          f"quantize with static_groups: true")  # fmt: skip
    return {"path": path, "config": config}


def onnx_artifact(path: Path, key: str) -> Path:
    """The fp16 standard ONNX artifact at `path` (target `key`) the plain TensorRT route builds from."""
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    build = manifest.get("build") or {}
    if (build.get("flavour"), build.get("precision")) != ("standard", "fp16"):
        raise FormatError(f"{key} is a {build.get('flavour')} {build.get('precision')} ONNX export; plain TensorRT "
                          f"needs the standard fp16 one: {{format: onnx, quant: fp16, options: {{flavour: "
                          f"standard}}}}")  # fmt: skip
    return path


def _gptq_linear(checkpoint, names: list[str], prefix: str, config: dict, dtype) -> dict[str, Any]:
    """A GPTQ v1 linear (or several, concatenated along the output) in TensorRT-LLM's W4A16_GPTQ terms."""
    import torch

    from pipeline.quantizers.gptq import unpack

    q = torch.cat([unpack(checkpoint.tensor(f"{n}.qweight"), 4, dim=0) for n in names], dim=1)  # [in, out] 0..15
    zeros = torch.cat([unpack(checkpoint.tensor(f"{n}.qzeros"), 4, dim=1) + 1 for n in names], dim=1)  # v1: +1
    scales = torch.cat([checkpoint.tensor(f"{n}.scales") for n in names], dim=1).float()  # [groups, out]
    return {
        f"{prefix}.weight": pack_int4((q - 8).to(torch.int8)),
        f"{prefix}.weights_scaling_factor": scales.to(dtype),
        f"{prefix}.zero": ((8 - zeros) * scales).to(dtype),
    }


def to_transformers_state(folder: Path) -> tuple[dict, dict[str, Any]]:
    """Map a prepared checkpoint back to a transformers state dict (float32, weight-only tensors dequantized) and
    the transformers config it stands for: the check that prepare lost nothing."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tensors = load_file(folder / "rank0.safetensors")
    state = {hf: tensors[trt].float() for trt, hf in TOP.items()}
    state["lm_head.weight"] = tensors["lm_head.weight"].float()
    head, kv = config["head_size"], config["num_key_value_heads"]
    sizes = {"attention.qkv": [config["num_attention_heads"] * head, kv * head, kv * head]}
    for i in range(config["num_hidden_layers"]):
        prefix, hf_prefix = f"transformer.layers.{i}", f"model.layers.{i}"
        for trt, hf_name in NORMS.items():
            state[f"{hf_prefix}.{hf_name}.weight"] = tensors[f"{prefix}.{trt}.weight"].float()
        for trt, members in LINEARS.items():
            weight = dequantize(tensors, f"{prefix}.{trt}", config["quantization"])
            parts = weight.split(sizes.get(trt, [weight.shape[0]]))
            bias = tensors.get(f"{prefix}.{trt}.bias")
            biases = bias.float().split(sizes.get(trt, [weight.shape[0]])) if bias is not None else [None] * len(parts)
            for member, part, b in zip(members, parts, biases):
                state[f"{hf_prefix}.{member}.weight"] = part
                if b is not None:
                    state[f"{hf_prefix}.{member}.bias"] = b
    return state, config


def dequantize(tensors: dict, prefix: str, quantization: dict):
    """The float weight [out, in] a linear's tensors stand for."""
    import torch

    weight, algo = tensors[f"{prefix}.weight"], quantization["quant_algo"]
    if algo is None:
        return weight.float()
    if algo == "W4A16_GPTQ":
        q = unpack_int4(weight).float()  # [in, out]
        scales, zero = tensors[f"{prefix}.weights_scaling_factor"].float(), tensors[f"{prefix}.zero"].float()
        group = torch.arange(q.shape[0]) // quantization["group_size"]
        return (q * scales[group] + zero[group]).T
    q = (weight if algo == "W8A16" else unpack_int4(weight)).float()  # [in, out]
    return (q * tensors[f"{prefix}.per_channel_scale"].float()).T


def checkpoint_tensors(checkpoint: Checkpoint, n_layers: int, quant: str, gptq: dict | None, dtype,
                       progress=None) -> dict[str, Any]:  # fmt: skip
    """Every tensor of the TensorRT-LLM checkpoint, read from the source (or the GPTQ artifact) layer by layer."""
    import torch

    tensors = {trt: checkpoint.tensor(hf_name).to(dtype) for trt, hf_name in TOP.items()}
    lm_head = "lm_head.weight" if "lm_head.weight" in checkpoint.names() else "model.embed_tokens.weight"
    tensors["lm_head.weight"] = checkpoint.tensor(lm_head).to(dtype)
    for i in range(n_layers):
        prefix, hf_prefix = f"transformer.layers.{i}", f"model.layers.{i}"
        for trt, hf_name in NORMS.items():
            tensors[f"{prefix}.{trt}.weight"] = checkpoint.tensor(f"{hf_prefix}.{hf_name}.weight").to(dtype)
        for trt, members in LINEARS.items():
            names = [f"{hf_prefix}.{m}" for m in members]
            if gptq:
                tensors.update(_gptq_linear(checkpoint, names, f"{prefix}.{trt}", gptq["config"], dtype))
            else:
                weight = torch.cat([checkpoint.tensor(f"{n}.weight") for n in names]).to(dtype)
                tensors.update(linear_tensors(weight, f"{prefix}.{trt}", quant, dtype))
            if f"{names[0]}.bias" in checkpoint.names():
                bias = torch.cat([checkpoint.tensor(f"{n}.bias") for n in names])
                tensors[f"{prefix}.{trt}.bias"] = bias.to(dtype)
        if progress:
            progress(i + 1, n_layers, "layers")
    return {k: v.contiguous() for k, v in tensors.items()}


class TensorRT(Format):
    name = "tensorrt"
    quants = ("fp16", "bf16", "w8a16", "w4a16", "w4a16_gptq")
    extra = "tensorrt"  # not a pip extra: TensorRT-LLM comes from NVIDIA's package index (see the README)
    library = "tensorrt-llm"
    options_model = Options
    hardware = {Step.BUILD: ("cpu", "cuda"), Step.VALIDATE: ("cpu", "cuda"), Step.ENGINE: ("cuda",)}
    options: Options

    @classmethod
    def check_options(cls, quant: str, options: Options) -> None:
        if options.max_input_len > options.max_seq_len:
            raise FormatError(f"max_input_len {options.max_input_len} exceeds max_seq_len {options.max_seq_len}")
        if options.onnx_target and quant != "fp16":
            raise FormatError(f"plain TensorRT builds fp16 engines from the fp16 standard ONNX export; drop "
                              f"onnx_target for {quant}, whose engine TensorRT-LLM builds")  # fmt: skip
        if options.engine_route == "onnx" and not options.onnx_target:
            raise FormatError("engine_route onnx needs onnx_target: the recipe's fp16 standard ONNX target, e.g. "
                              "onnx/fp16 with options {flavour: standard}")  # fmt: skip
        for key, kind in ((options.gptq_target if quant == "w4a16_gptq" else None, "gptq"),
                          (options.onnx_target, "onnx")):  # fmt: skip
            if key is not None and not key.startswith(f"{kind}/"):
                raise FormatError(f"{key!r} is not a {kind} target (expected {kind}/<quant or name>)")

    @property
    def steps(self) -> tuple[Step, ...]:
        return (Step.BUILD, Step.VALIDATE, Step.ENGINE, Step.PUBLISH)

    def depends_on(self) -> list[str]:
        """w4a16_gptq is made from the recipe's GPTQ artifact, a plain TensorRT engine from its ONNX artifact."""
        return [self.options.gptq_target] * (self.quant == "w4a16_gptq") + [self.options.onnx_target] * bool(
            self.options.onnx_target
        )

    def check(self, source: SourceInfo) -> None:
        refuse_unless(arch(source.model_type).trtllm is not None, "TensorRT-LLM", source.model_type, "trtllm",
                      "weightsmith's checkpoint converter has no tensor map for it")  # fmt: skip
        if self.quant == "w4a16" and source.config()["hidden_size"] % 2:
            raise FormatError("w4a16 packs two values a byte: the hidden size must be even")

    def build(self, source: SourceInfo, out_dir: Path, ctx: BuildContext) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file

        key = self.options.gptq_target
        gptq = gptq_artifact(ctx.inputs[key], key) if self.quant == "w4a16_gptq" else None
        config = checkpoint_config(source.config(), self.quant, gptq["config"]["group_size"] if gptq else None)
        layout = "unprocessed" if self.quant in WEIGHT_BITS else "plain"
        gptq_name = gptq["path"].name if gptq else None
        written = config.model_dump(exclude_none=False)
        written["weightsmith"] = {"weight_layout": layout, "source": source.spec, "gptq_artifact": gptq_name}
        dtype = torch.bfloat16 if self.quant == "bf16" else torch.float16
        checkpoint = Checkpoint(gptq["path"] if gptq else source.path)
        tensors = checkpoint_tensors(checkpoint, config.num_hidden_layers, self.quant, gptq, dtype, ctx.progress)
        save_file(tensors, out_dir / "rank0.safetensors")
        (out_dir / "config.json").write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
        for file in source.tokenizer_files:  # the engine's runner tokenizes with the source's files
            shutil.copy(source.path / file, out_dir / file)
        return {"quant_algo": QUANT_ALGO[self.quant], "tensors": len(tensors), "weight_layout": layout,
                "gptq_artifact": gptq_name}  # fmt: skip

    def needs(self, size: ModelSize, validation: Validation, calibration: Calibration) -> Needs:
        """The converter holds the whole checkpoint it writes (rank0.safetensors); validation maps it back into
        transformers in float32."""
        written = size.at_bits(16 if self.quant in ("fp16", "bf16") else 8.5)
        return Needs({Step.BUILD: 2 * written, Step.VALIDATE: size.float32 + written}, disk=written)

    def open_runtime(self, artifact: Path, reference, validation: Validation):
        """The prepared checkpoint mapped back into transformers: validated on any machine, against the source."""
        from pipeline.runtimes.transformers import TorchRuntime

        return TorchRuntime(
            transformers_model(artifact, reference),
            {"runtime": "transformers (TensorRT-LLM checkpoint mapped back)", "device": "cpu"},
        )

    def engine(self, artifact: Path, reference, validation: Validation, inputs) -> dict[str, Any]:
        """Build and smoke-test the engine where a CUDA worker with TensorRT-LLM or TensorRT allows it, else say why."""
        from pipeline.formats import tensorrt_engine

        onnx: Path | str | None = None
        if key := self.options.onnx_target:
            try:
                onnx = onnx_artifact(inputs[key], key) if key in inputs else f"{key} has no validated artifact"
            except FormatError as exc:
                onnx = str(exc)
        return tensorrt_engine.build_and_smoke(artifact, self.options, self.quant, reference, validation, onnx)

    def handoff_files(self, artifact: Path, manifest: Manifest, chat: dict[str, Any]) -> dict[str, str]:
        """A trtllm-serve script for the engine, with the build command in a comment."""
        serve = ["trtllm-serve", "engine", "--tokenizer", ".", "--host", "127.0.0.1", "--port", "8000"]
        build = ["trtllm-build", "--checkpoint_dir", ".", "--output_dir", "engine"]
        return {
            "trtllm-serve.sh": "# build the engine on the CUDA worker first (weightsmith does this when it can):\n"
            + "# "
            + shlex.join(build)
            + "\n"
            + handoff.script(serve)
        }


def transformers_model(folder: Path, reference):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    state, _ = to_transformers_state(folder)
    config = AutoConfig.from_pretrained(reference.source)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("rotary_emb.inv_freq")]:
        raise ValueError(f"the checkpoint does not map back: missing {missing}, unexpected {unexpected}")
    return model.eval()
