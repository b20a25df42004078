"""compressed-tensors checkpoints (`format: compressed`): the quantized Hugging Face layout that vLLM, SGLang and
TensorRT-LLM's PyTorch backend load, written with the `compressed-tensors` library itself.

Quants, each a preset scheme of the library applied to the decoder layers' linears (`pipeline.archs` `gptq_linears`;
embeddings, norms and lm_head stay 16-bit, the `ignore: ["lm_head"]` convention with `targets: ["Linear"]`):

- `w4a16` (preset W4A16, stored `pack-quantized`): 4-bit symmetric weights, groups of 128 by default, 16-bit
  activations, made from the recipe's GPTQ int4 artifact (option `gptq_target`, default `gptq/int4`) rather than by
  solving GPTQ again: its levels and float16 scales carry over unchanged (compressed-tensors' signed level = GPTQ's
  level - 8, the same scale), so the weights decompress to exactly what the GPTQ artifact stands for. An artifact
  with scattered act-order groups (`desc_act: true`), asymmetric grids, 8 bits or group 256 is refused: vLLM's
  compressed-tensors loader rejects group act-order and its 4-bit kernels take groups -1/32/64/128.
- `w8a8` (preset W8A8, `int-quantized`): INT8 weights per output channel, symmetric, round-to-nearest; INT8
  activations quantized per token at run time (dynamic).
- `fp8` (preset FP8_DYNAMIC, `float-quantized`): FP8 E4M3 weights per output channel, round-to-nearest; FP8
  activations per token, dynamic.
- Both first apply SmoothQuant's input scaling (`pipeline.quantizers.smooth`, option `smoothing`: α, `auto` = 0.5
  where the architecture row names the norms that feed the linears, null = off), computed from the recipe's
  calibration text: it moves activation outliers into the weights without changing the float model.
- `nvfp4` (preset NVFP4A16, `nvfp4-pack-quantized`): FP4 E2M1 weights in groups of 16 with FP8 E4M3 group scales
  under one float32 global scale per tensor (the library's `generate_gparam`: the largest group scale lands on FP8's
  top), round-to-nearest; 16-bit activations. transformers runs it in bfloat16 only (compressed-tensors unpacks FP4
  to bfloat16), so it is validated in bfloat16.

Who does what: the library builds the `QuantizationScheme`/`QuantizationConfig` from its presets, computes the w8a8
and fp8 scales (`calculate_qparams`, the min-max observer llm-compressor uses by default), quantizes and packs every
weight with its registered compressor for the format (`BaseCompressor.get_value_from_registry(format).compress`,
the per-module classmethod that `ModelCompressor.compress_model` calls), and writes `quantization_config` into
config.json (`ModelCompressor.update_config`). We only read tensors, pick what is quantized and write the shards.

Streaming: the build never loads the model. Tensors are read one at a time from the source's (or the GPTQ artifact's)
safetensors files and written into shards of at most `shard_size`; one shard's worth is in memory at a time.
Validation loads the whole model: transformers' `from_pretrained`, which hands the checkpoint to compressed-tensors;
on CPU the weights are decompressed (to float32) on the first forward pass and the activations of w8a8/fp8 are
fake-quantized per token by compressed-tensors' own forward, which is what `validated_by` records.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline import handoff
from pipeline.archs import ARCHS, arch
from pipeline.formats.base import BuildContext, Format, ServedByVllm, missing_modules, parse_size
from pipeline.formats.base import Options as BaseOptions
from pipeline.types import FormatError, Manifest, Serving, SourceInfo, Step, Validation

PRESETS = {"w4a16": "W4A16", "w8a8": "W8A8", "fp8": "FP8_DYNAMIC", "nvfp4": "NVFP4A16"}
STORED = {"w4a16": "pack-quantized", "w8a8": "int-quantized", "fp8": "float-quantized", "nvfp4": "nvfp4-pack-quantized"}
TARGETS, IGNORE = ["Linear"], ["lm_head"]
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
VLLM = "vLLM 0.32's compressed-tensors loader rules"
SGLANG = "SGLang's compressed-tensors schemes (W8A8 FP8, W8A8 INT8, WNA16)"
VLLM_GROUPS = (-1, 32, 64, 128)  # what vLLM's 4-bit (Marlin/Machete) kernels take
# which kernels serve it: a note, not a loader refusal (measured on vLLM's CPU build, ../shared/FINDINGS.md)
KERNELS = {
    "w4a16": "vLLM's CPU AVX2 build has no W4A16 kernel (cpu_gemm_wna16): it loads, then fails at warm-up; "
    "use a GPU or the AVX512 build",
    "w8a8": "vLLM's CPU AVX2 build has no INT8 W8A8 kernel (int8_scaled_mm): it loads, then fails at warm-up; "
    "use a GPU or the AVX512 build",
    "fp8": "FP8 W8A8 kernels need a GPU of compute capability 8.9 or newer (vLLM falls back to weight-only FP8 on "
    "8.0); vLLM's CPU build was not tried with FP8",
    "nvfp4": "NVFP4 weights need an NVIDIA GPU: FP4 tensor cores on Blackwell, a weight-only FP4 Marlin kernel on "
    "older ones; vLLM's CPU build was not tried with NVFP4",
}

WEIGHTS = {"nvfp4": "round-to-nearest FP4 E2M1 in groups of 16, FP8 E4M3 group scales under a float32 global scale "
                    "(compressed-tensors' generate_gparam and min-max qparams)"}  # fmt: skip
NVFP4_GROUP = 16
SMOOTH_ALPHA, SMOOTH_BY_DEFAULT = 0.5, ("w8a8", "fp8")  # the paper's α; measured on SmolLM2: see README


class Options(BaseOptions):
    """Target options for compressed-tensors."""

    gptq_target: str = "gptq/int4"  # w4a16: the recipe's GPTQ int4 target whose artifact is converted
    group_size: Literal[-1, 32, 64, 128] | None = None  # w4a16: the group size expected (None: the artifact's)
    # w8a8/fp8: SmoothQuant's α (pipeline.quantizers.smooth), activation outliers moved into the weights using the
    # recipe's calibration text; auto: 0.5 where the architecture row has `smooth_norms`; None: off
    smoothing: float | Literal["auto"] | None = Field(default="auto")
    shard_size: int = 2_000_000_000  # bytes per safetensors shard

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value)


class Compressed(ServedByVllm, Format):
    name = "compressed"
    shares_process = True  # torch and compressed-tensors: safe beside other targets (pipeline.lanes)
    quants = ("w4a16", "w8a8", "fp8", "nvfp4")
    extra = "compressed"
    library = "transformers"
    options_model = Options
    hardware = {Step.BUILD: ("cpu", "cuda"), Step.VALIDATE: ("cpu", "cuda")}
    options: Options

    @classmethod
    def check_options(cls, quant: str, options: Options) -> None:
        if quant != "w4a16" and options.group_size is not None:
            raise FormatError(f"{quant} quantizes per output channel: group_size applies to w4a16 only")
        if quant in ("w4a16", "nvfp4") and options.smoothing not in ("auto", None):
            raise FormatError(f"{quant} keeps 16-bit activations: smoothing applies to w8a8 and fp8 only")
        if isinstance(options.smoothing, float) and not 0 <= options.smoothing <= 1:
            raise FormatError(f"smoothing is SmoothQuant's alpha, between 0 and 1; got {options.smoothing}")
        if not options.gptq_target.startswith("gptq/"):
            raise FormatError(f"{options.gptq_target!r} is not a gptq target (expected gptq/<quant or name>)")

    def gpu_only_serve(self) -> str | None:
        """FP8 and NVFP4 are served on GPUs; vLLM's CPU build was not tried with them, so not started without CUDA."""
        import torch

        if self.quant in ("fp8", "nvfp4") and not torch.cuda.is_available():
            return f"no_cuda_device: {KERNELS[self.quant]}"
        return None

    @property
    def alpha(self) -> float | None:
        """SmoothQuant's α for this target, or None (no smoothing); `auto` is decided per source in `smoothing_for`."""
        if self.options.smoothing == "auto":
            return SMOOTH_ALPHA if self.quant in SMOOTH_BY_DEFAULT else None
        return None if self.quant in ("w4a16", "nvfp4") else self.options.smoothing

    @property
    def calibrates(self) -> bool:
        return self.alpha is not None

    def depends_on(self) -> list[str]:
        """w4a16 is made from the recipe's GPTQ int4 artifact."""
        return [self.options.gptq_target] if self.quant == "w4a16" else []

    def missing_dependency(self, step: Step) -> str | None:
        if step == Step.SERVE:
            return self.missing_vllm() or self.gpu_only_serve()
        if step in (Step.BUILD, Step.VALIDATE):
            return missing_modules({"compressed_tensors": "compressed-tensors"}, self.extra)
        return None

    def check(self, source: SourceInfo) -> None:
        row = arch(source.model_type)
        if not row.compressed:
            fits = sorted(m for m, r in ARCHS.items() if r.compressed)
            raise FormatError(f"compressed-tensors does not support architecture {source.model_type!r}: weightsmith "
                              f"quantizes dense models whose decoder layers' linears are all quantized "
                              f"(supported: {', '.join(fits)})")  # fmt: skip
        if self.quant == "nvfp4" and (odd := uneven_linears(source.path, row.gptq_linears, NVFP4_GROUP)):
            raise FormatError(f"nvfp4 quantizes groups of {NVFP4_GROUP} inputs: {odd[0]} has "
                              f"{odd[1]} (use fp8 or w8a8 for this model)")  # fmt: skip
        if isinstance(self.options.smoothing, float) and not row.smooth_norms:
            raise FormatError(f"smoothing: weightsmith does not know which norms feed the linears of "
                              f"{source.model_type!r} (its row has no smooth_norms): set smoothing: null")  # fmt: skip
        stray = unlisted_linears(source.path, row.gptq_linears)
        if stray:
            raise FormatError(f"compressed-tensors' `Linear` target would also quantize {stray[0]}, which is not one "
                              f"of the decoder layers' linears weightsmith quantizes")  # fmt: skip

    def build(self, source: SourceInfo, out_dir: Path, ctx: BuildContext) -> dict[str, Any]:
        if self.quant == "w4a16":
            key = self.options.gptq_target
            gptq = gptq_artifact(ctx.inputs[key], key, self.options.group_size)
            facts = write_from_gptq(gptq, out_dir, self.options.shard_size, ctx.progress)
            facts["gptq_artifact"] = gptq["path"].name
        else:
            alpha = self.alpha if arch(source.model_type).smooth_norms else None
            facts = write_rtn(source, self.quant, out_dir, self.options.shard_size, ctx.progress,
                              smoothing_for(source, alpha, ctx.calibration, ctx.progress))  # fmt: skip
        write_config(source, facts.pop("qconfig"), facts["dtype"], out_dir)
        for name in [*source.tokenizer_files, "generation_config.json"]:
            if (source.path / name).is_file():
                shutil.copy(source.path / name, out_dir / name)
        return {**facts, "kernels": KERNELS[self.quant]}

    def open_runtime(self, artifact: Path, reference, validation: Validation):
        return open_compressed(artifact)

    def validate(self, artifact: Path, reference, validation: Validation) -> dict[str, Any]:
        result = super().validate(artifact, reference, validation)
        result["smoke"]["validated_by"] = result["smoke"]["runtime"]["validated_by"]
        return result

    def serving(self, artifact: Path) -> dict[str, Serving]:
        qconfig = read_qconfig(artifact)
        why = vllm_refusal(qconfig)
        sglang_why = why or (f"NVFP4 weight-only is not among {SGLANG}" if self.quant == "nvfp4" else None)
        return {"vllm": Serving(accepts=why is None, why=why, by=VLLM),
                "sglang": Serving(accepts=sglang_why is None, why=sglang_why, by=SGLANG)}  # fmt: skip

    def handoff_files(self, artifact: Path, manifest: Manifest, chat: dict[str, Any]) -> dict[str, str]:
        """vLLM and SGLang serve scripts (compressed-tensors is detected from config.json), where they take it."""
        name, context = handoff.model_name(manifest), str(chat["context"])
        vllm = handoff.vllm_command("--served-model-name", name, "--max-model-len", context)
        sglang = ["python3", "-m", "sglang.launch_server", "--model-path", ".", "--served-model-name", name,
                  "--context-length", context]  # fmt: skip
        files = {}
        if manifest.serving["vllm"].accepts:
            files["vllm-serve.sh"] = with_note(handoff.script(vllm), KERNELS[self.quant])
        if manifest.serving["sglang"].accepts:
            files["sglang-serve.sh"] = handoff.script(sglang)
        return files


# the scheme and the config


def scheme(quant: str, group_size: int | None = None):
    """The library's preset scheme for `quant` on `Linear` modules, stored in its format; w4a16 with `group_size`
    (-1: one scale per output channel)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    preset = preset_name_to_scheme(PRESETS[quant], TARGETS)
    weights = preset.weights
    if quant == "w4a16" and group_size is not None:
        grid = {"strategy": "channel", "group_size": None} if group_size == -1 else {"group_size": group_size}
        weights = QuantizationArgs.model_validate({**weights.model_dump(), **grid})
    return QuantizationScheme(targets=TARGETS, weights=weights, input_activations=preset.input_activations,
                              format=STORED[quant])  # fmt: skip


def quantization_config(chosen):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(config_groups={"group_0": chosen}, ignore=IGNORE, format=chosen.format,
                              quantization_status="compressed")  # fmt: skip


def write_config(source: SourceInfo, qconfig, dtype: str, out_dir: Path) -> None:
    """The source's config.json (16-bit dtype, no earlier quantization_config), to which the library adds its
    `quantization_config` (ModelCompressor.update_config: version, quant_method compressed-tensors, the groups)."""
    from compressed_tensors.compressors import ModelCompressor

    from pipeline.checkpoint import portable_config

    config = {k: v for k, v in portable_config(source.config()).items() if k != "quantization_config"}
    config.update({"torch_dtype": dtype, "dtype": dtype})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    ModelCompressor(quantization_config=qconfig).update_config(str(out_dir))


def read_qconfig(artifact: Path) -> dict[str, Any]:
    return json.loads((artifact / "config.json").read_text(encoding="utf-8"))["quantization_config"]


# the weights


def quantized(name: str, linears: tuple[str, ...]) -> bool:
    """Whether checkpoint tensor `name` is the weight of a decoder layer linear that is quantized."""
    return name.startswith("model.layers.") and name.endswith(tuple(f".{linear}.weight" for linear in linears))


def unlisted_linears(folder: Path, linears: tuple[str, ...]) -> list[str]:
    """2-D weights in the decoder layers that are not among `linears` (the `Linear` target would take them)."""
    from pipeline.checkpoint import Checkpoint

    checkpoint = Checkpoint(folder)
    return [n for n in checkpoint.names() if n.startswith("model.layers.") and n.endswith(".weight")
            and len(checkpoint.shape(n)) == 2 and not quantized(n, linears)]  # fmt: skip


def uneven_linears(folder: Path, linears: tuple[str, ...], group: int) -> tuple[str, int] | None:
    """The first quantized linear whose input width is not a multiple of `group`, and that width; or None."""
    from pipeline.checkpoint import Checkpoint

    checkpoint = Checkpoint(folder)
    for name in checkpoint.names():
        if quantized(name, linears) and checkpoint.shape(name)[1] % group:
            return name, checkpoint.shape(name)[1]
    return None


def artifact_dtype(source: SourceInfo) -> str:
    """Unquantized tensors keep the source's 16-bit dtype; a float32 source is stored in bfloat16."""
    return source.dtype if source.dtype in ("bfloat16", "float16") else "bfloat16"


def smoothing_for(source: SourceInfo, alpha: float | None, calibration, progress=None) -> dict[str, Any] | None:
    """SmoothQuant's per-layer input scales for the source on the recipe's calibration samples ({"alpha", "scales",
    "calibration"}), or None when `alpha` is None."""
    if alpha is None:
        return None
    from pipeline.corpus import calibration_samples, load_text
    from pipeline.quantizers.smooth import smoothing_scales
    from pipeline.source import load_tokenizer

    tokenizer = load_tokenizer(source.path, source.trust_remote_code)
    text = load_text(calibration.text, "calibration")
    samples = calibration_samples(tokenizer, text, calibration.samples, calibration.seq_len, calibration.seed)
    scales = smoothing_scales(source, samples, arch(source.model_type).smooth_norms, alpha, progress)
    return {"alpha": alpha, "scales": scales, "calibration": {"text": calibration.text, "samples": len(samples),
                                                                "seq_len": calibration.seq_len}}  # fmt: skip


def write_rtn(source: SourceInfo, quant: str, out_dir: Path, shard_size: int, progress=None,
              smoothing: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """w8a8/fp8: every tensor of the source, one at a time; the decoder layers' linears round-to-nearest with the
    library's qparams and compressor, the rest in the artifact's 16-bit dtype; with `smoothing` (`smoothing_for`),
    SmoothQuant's scales divided out of the norms and multiplied into the linears first."""
    import torch

    from pipeline.checkpoint import Checkpoint, ShardWriter
    from pipeline.quantizers.smooth import smoothed

    chosen, dtype = scheme(quant), artifact_dtype(source)
    checkpoint, writer = Checkpoint(source.path), ShardWriter(out_dir, shard_size)
    row = arch(source.model_type)
    linears, names, count = row.gptq_linears, checkpoint.names(), 0
    for index, name in enumerate(names):
        tensor = checkpoint.tensor(name)
        if smoothing:
            tensor = smoothed(name, tensor, smoothing["scales"], row.smooth_norms)
        if quantized(name, linears):
            count += 1
            for key, value in rtn_linear(tensor, chosen).items():
                writer.add(f"{name.removesuffix('weight')}{key}", value)
        else:
            writer.add(name, tensor.to(getattr(torch, dtype)))
        if progress:
            progress(index + 1, len(names), "tensors")
    writer.close()
    return {"scheme": PRESETS[quant], "format": STORED[quant], "dtype": dtype, "quantized_linears": count,
            "weights": WEIGHTS.get(quant, "round-to-nearest, compressed-tensors' min-max qparams (float32 scales)"),
            "qconfig": quantization_config(chosen),
            "smoothing": {k: v for k, v in smoothing.items() if k != "scales"} if smoothing else None}  # fmt: skip


def rtn_linear(weight, chosen) -> dict[str, Any]:
    """One linear's compressed tensors ({"weight", "weight_scale"}): per-output-channel min/max -> the library's scale
    (symmetric: max|w| / 127.5 for INT8, / 448 for FP8 E4M3), kept in float32 so that no rounding of the scale pushes
    the largest weight of a row past the grid; quantized by the format's registered compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.float()
    compressor = BaseCompressor.get_value_from_registry(chosen.format)
    if chosen.weights.strategy == "tensor_group":
        return nvfp4_linear(w, chosen, compressor)
    scale, zero = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), chosen.weights)
    return compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero}, chosen)


def nvfp4_linear(w, chosen, compressor) -> dict[str, Any]:
    """NVFP4: the tensor's global scale (FP8 max x FP4 max / max|w|), then each group of 16's scale (its max|w| / 6,
    times the global scale, rounded to FP8 E4M3), quantized and packed two to a byte by the library."""
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    size = chosen.weights.group_size
    global_scale = generate_gparam(w.min(), w.max())
    groups = w.reshape(w.shape[0], -1, size)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), chosen.weights, global_scale=global_scale)
    return compressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": global_scale}, chosen)


def gptq_artifact(path: Path, key: str, group_size: int | None) -> dict[str, Any]:
    """The validated GPTQ artifact at `path` (target `key`) and its config, if compressed-tensors' W4A16 takes it."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    refused = gptq_refusal(config, group_size)
    if refused:
        raise FormatError(f"{key} cannot become compressed-tensors w4a16: {refused}")
    return {"path": path, "config": config}


def gptq_refusal(config: dict[str, Any], group_size: int | None) -> str | None:
    """What in a GPTQ artifact's quantization config W4A16 (as vLLM loads it) cannot take, or None."""
    if config.get("bits") != 4:
        return f"it is a {config.get('bits')}-bit GPTQ artifact; w4a16 needs 4 bits"
    if config.get("desc_act") and config.get("group_size") != -1:
        return ("it uses act-order with scattered groups (desc_act true), which compressed-tensors rejects (group "
                "act-order); quantize with static_groups: true")  # fmt: skip
    if not config.get("sym", True):
        return "it is asymmetric (sym false); w4a16 is symmetric: quantize with sym: true"
    if config.get("group_size") not in VLLM_GROUPS:
        return f"its group size {config.get('group_size')} is not one of -1/32/64/128 (vLLM's 4-bit kernels)"
    if group_size is not None and group_size != config["group_size"]:
        return f"its group size is {config['group_size']}, the target's group_size option says {group_size}"
    return None


def write_from_gptq(gptq: dict[str, Any], out_dir: Path, shard_size: int, progress=None) -> dict[str, Any]:
    """w4a16: the GPTQ artifact's tensors one linear at a time; float tensors as stored (float16)."""
    from pipeline.checkpoint import Checkpoint, ShardWriter

    chosen = scheme("w4a16", gptq["config"]["group_size"])
    checkpoint, writer = Checkpoint(gptq["path"]), ShardWriter(out_dir, shard_size)
    names = checkpoint.names()
    modules = [n.removesuffix(".qweight") for n in names if n.endswith(".qweight")]
    for name in names:
        if not name.endswith(GPTQ_TENSORS):
            writer.add(name, checkpoint.tensor(name))
    for index, module in enumerate(modules):
        for key, value in gptq_linear({k: checkpoint.tensor(f"{module}.{k}") for k in GPTQ_TENSORS}, chosen,
                                      module).items():  # fmt: skip
            writer.add(f"{module}.{key}", value)
        if progress:
            progress(index + 1, len(modules), "linears")
    writer.close()
    return {"scheme": PRESETS["w4a16"], "format": STORED["w4a16"], "dtype": "float16", "quantized_linears":
            len(modules), "weights": "GPTQ's levels and float16 scales, unchanged", "group_size":
            gptq["config"]["group_size"], "qconfig": quantization_config(chosen)}  # fmt: skip


def gptq_linear(tensors: dict[str, Any], chosen, module: str) -> dict[str, Any]:
    """A GPTQ v1 linear in compressed-tensors' pack-quantized tensors. The library's compressor quantizes our exact
    dequantization with the same float16 scales (transposed to [out, groups]); its levels must come out as GPTQ's
    level - 8 (signed), which is checked, so nothing is re-rounded."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from pipeline.quantizers.gptq import from_checkpoint, unpack

    groups, columns = tensors["scales"].shape[0], tensors["g_idx"].shape[0]
    width = columns // groups
    if not torch.equal(tensors["g_idx"].long(), torch.arange(columns) // width):
        raise FormatError(f"{module}: g_idx is not in input order (act-order groups); compressed-tensors rejects it")
    if not bool((unpack(tensors["qzeros"], 4, dim=1) == 7).all()):  # v1 stores zero - 1: 8 - 1 when symmetric
        raise FormatError(f"{module}: the GPTQ zero points are not all 8: the artifact is not symmetric")
    compressor = BaseCompressor.get_value_from_registry(chosen.format)
    scale = tensors["scales"].T.contiguous()
    out = compressor.compress({"weight": from_checkpoint(tensors, 4), "weight_scale": scale}, chosen)
    levels = unpack(tensors["qweight"], 4, dim=0).T - 8
    if not torch.equal(unpack_from_int32(out["weight_packed"], 4, out["weight_shape"]).long(), levels):
        raise RuntimeError(f"{module}: compressed-tensors re-rounded GPTQ's levels")
    return out


# validation and serving


def open_compressed(path: Path):
    """transformers' own loading of a compressed-tensors checkpoint (its CompressedTensorsHfQuantizer hands it to
    compressed-tensors): the linears load compressed and compressed-tensors decompresses them on the first forward;
    w8a8/fp8 activations are then fake-quantized per token by compressed-tensors' quantized forward. On CPU in
    float32 (the reference's dtype), on CUDA in float16."""
    from importlib.metadata import version

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.runtimes.transformers import TorchRuntime

    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    if read_qconfig(path)["format"] == STORED["nvfp4"]:
        dtype = torch.bfloat16  # compressed-tensors unpacks FP4 to bfloat16 and computes the linears in it
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cuda" if cuda else "cpu",
                                                       output_loading_info=True)  # fmt: skip
    left = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
    if left:
        raise RuntimeError(f"transformers left {len(left)} tensors unmatched ({', '.join(left[:3])} ...)")
    chosen = getattr(model.model.layers[0].self_attn.q_proj, "quantization_scheme", None)
    if chosen is None:
        raise RuntimeError("transformers loaded the linears without their compressed-tensors scheme")
    versions = f"transformers {version('transformers')} + compressed-tensors {version('compressed-tensors')}"
    return TorchRuntime(model.eval(), {"runtime": versions, "device": "cuda" if cuda else "cpu",
                                       "validated_by": f"{versions} ({computed(chosen, dtype)})"})  # fmt: skip


def computed(chosen, dtype) -> str:
    """What the loaded model computes with, in words."""
    name = str(dtype).removeprefix("torch.")
    how = f"weights decompressed to {name} by compressed-tensors on the first forward"
    acts = chosen.input_activations
    if acts is None:
        return f"{how}; activations unquantized"
    kind = "FP8 E4M3" if acts.type == "float" else f"INT{acts.num_bits}"
    return f"{how}; input activations fake-quantized to {kind} per {acts.strategy}, dynamic, in {name}"


def vllm_refusal(qconfig: dict[str, Any]) -> str | None:
    """What vLLM's compressed-tensors loader refuses in a `quantization_config`, or None: group/dynamic act-order
    (../shared/FINDINGS.md) and 4-bit groups its kernels lack."""
    for group in qconfig["config_groups"].values():
        weights = group["weights"]
        if weights.get("actorder") in ("group", "dynamic"):
            return f"vLLM's compressed-tensors rejects {weights['actorder']} act-order"
        if weights["type"] == "int" and weights["num_bits"] == 4 and weights["strategy"] == "group" and \
                weights["group_size"] not in VLLM_GROUPS:  # fmt: skip
            return f"vLLM's 4-bit kernels take groups -1/32/64/128; this one has group {weights['group_size']}"
    return None


def with_note(script: str, note: str) -> str:
    """`script` with a comment line after its first two (shebang, cd)."""
    lines = script.split("\n")
    return "\n".join([*lines[:2], f"# {note}", *lines[2:]])
