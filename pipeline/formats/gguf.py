"""GGUF, llama.cpp's format (llama.cpp, Ollama, LocalAI, LM Studio, llama-server).

Two routes to a file, chosen by quant (the `QUANTS` table):

- `direct` (f32, f16, bf16, q8_0): written with gguf-py's `GGUFWriter`, streaming: the tensor table is planned
  from the safetensors headers alone, then each tensor is read, converted and written in turn, a block of rows at
  a time, so peak memory is about one tensor rather than the model. Tensor types follow llama.cpp's own converter
  (`convert_hf_to_gguf.py`), and so do the bytes: 1-D tensors, norms and biases stay F32, a matrix whose rows are
  not a multiple of the quant block falls back to F16, and Q8_0 uses gguf-py's quantizer, which reproduces ggml's
  C reference bit for bit (checked in the tests).
- `llama.cpp` (the legacy Q4_0 ... Q5_1, the K-quants, IQ4): a direct F16/BF16/F32 file is written first, then
  llama.cpp's own quantizer (`llama_model_quantize`, the function behind `llama-quantize`, through
  llama-cpp-python) makes the final file, with an importance matrix when the target asks for one
  (`pipeline.formats.gguf_imatrix`). K-quant search is not re-implemented here.

Architecture and tokenizer metadata come from `gguf_arch` (the architecture table and gguf-py's tensor map) and
`gguf_vocab`. The file is validated in llama.cpp itself, through llama-cpp-python (the `gguf` extra). Hand-off files:
an Ollama Modelfile, a LocalAI model config and a llama-server script.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import yaml
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType
from pydantic import field_validator

from pipeline import handoff
from pipeline.checkpoint import Checkpoint
from pipeline.formats import gguf_quantize
from pipeline.formats.base import BuildContext, Format, Progress, missing_modules, parse_size
from pipeline.formats.base import Options as BaseOptions
from pipeline.formats.gguf_arch import (
    Architecture,
    add_hparams,
    architecture,
    check_config,
    extra_tensors,
    permute_qk,
    text_config,
)
from pipeline.formats.gguf_arch import pieces as tensor_pieces
from pipeline.formats.gguf_arch import tensor_name as gguf_tensor_name
from pipeline.formats.gguf_vocab import add_to_writer, load_vocab
from pipeline.quantizers import imatrix as importance
from pipeline.resources import ModelSize, Needs
from pipeline.runtimes.llama_cpp import LlamaCppRuntime
from pipeline.types import Calibration, FormatError, Manifest, SourceInfo, Step, Validation

# recipe quant -> route. Direct quants name the tensor type of their weight matrices; llama.cpp quants are named
# after llama.cpp's file types (q4_k_m -> LLAMA_FTYPE_MOSTLY_Q4_K_M).
DIRECT = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
# bits a weight of each type, for the estimates of `pipeline.resources` (block scales included, rounded up)
GGUF_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_0": 5.5, "q5_1": 6, "q5_k_s": 5.5,
             "q5_k_m": 5.7, "q4_0": 4.5, "q4_1": 5, "q4_k_s": 4.6, "q4_k_m": 4.9, "iq4_nl": 4.5, "iq4_xs": 4.3,
             "q3_k_s": 3.5, "q3_k_m": 3.9, "q3_k_l": 4.3, "q2_k": 3.4}  # fmt: skip
LLAMA_CPP = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
             "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")  # fmt: skip
IMATRIX_FILE = "imatrix.gguf"


class Options(BaseOptions):
    """Target options for GGUF."""

    imatrix: bool = False  # quantize with an importance matrix from the recipe's calibration text (llama.cpp route)
    base: Literal["auto", "f32", "f16", "bf16"] = "auto"  # the file llama.cpp quantizes from (auto: bf16 for bf16)
    split_max_size: int | None = None  # bytes per file; larger outputs become llama.cpp's -0000N-of-0000M shards

    @field_validator("split_max_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value)


def file_type(quant: str) -> LlamaFileType:
    return LlamaFileType.ALL_F32 if quant == "f32" else LlamaFileType[f"MOSTLY_{quant.upper()}"]


@dataclass(frozen=True)
class TensorPlan:
    hf_names: tuple[str, ...]  # one tensor, the experts of a merged one, or none (generated, see extra_tensors)
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Q
    transform: Callable | None = None  # a piece of a row's named transform (gguf_arch.TRANSFORMS), on the read tensor

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)

    def read(self, checkpoint: Checkpoint):
        """The tensor from the checkpoint; a layer's experts stacked [experts, out, in], as llama.cpp keeps them;
        transformed if it is a piece of a transform."""
        import torch

        if len(self.hf_names) == 1:
            tensor = checkpoint.tensor(self.hf_names[0])
        else:
            tensor = torch.stack([checkpoint.tensor(name) for name in self.hf_names])
        return self.transform(tensor) if self.transform else tensor


# tensors llama.cpp's converter keeps in F32 whatever the file type (routers, convolutions: small, and read as F32)
F32_TENSORS = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP, gguf.MODEL_TENSOR.SSM_CONV1D)
F32_NAMES = re.compile("|".join(re.escape(gguf.TENSOR_NAMES[t]).replace(r"\{bid\}", r"\d+") for t in F32_TENSORS))


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> Q:
    """The GGML type of one tensor in a direct file of the given quant, as llama.cpp's converter chooses it."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    if F32_NAMES.fullmatch(gguf_name.removesuffix(".weight")):
        return Q.F32
    qtype = DIRECT[quant]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block_size == 0 else Q.F16


def plan_tensors(checkpoint: Checkpoint, arch: Architecture, config: dict, quant: str) -> list[TensorPlan]:
    import torch

    plan = []
    for hf_name, members in merged_experts(checkpoint).items():
        shape = checkpoint.shape(members[0])
        if len(members) > 1:
            shape = (len(members), *shape)
        for piece, transform in tensor_pieces(arch, hf_name, config):
            name = gguf_tensor_name(arch, piece)
            if name is not None:
                out = tuple(transform(torch.empty(shape, device="meta")).shape) if transform else tuple(shape)
                plan.append(TensorPlan(members, name, out, tensor_type(name, out, quant), transform))
    for name, tensor in extra_tensors(arch, config).items():
        plan.append(TensorPlan((), name, tuple(tensor.shape), Q.F32))
    return sorted(plan, key=_writing_order)


EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.(?P<expert>\d+)\.(?P<part>[^.]+)\.(?P<kind>weight|bias)$")


def merged_experts(checkpoint: Checkpoint) -> dict[str, tuple[str, ...]]:
    """The checkpoint's tensors by the name llama.cpp's converter gives them: one tensor by its own name, a layer's
    per-expert tensors (`mlp.experts.3.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.3.w1.weight`) under the
    merged name (`mlp.experts.gate_proj.weight`), experts in order."""
    merged: dict[str, dict[int, str]] = {}
    for name in checkpoint.names():
        found = EXPERT.match(name)
        key = f"{found['layer']}.{found['part']}.{found['kind']}" if found else name
        merged.setdefault(key, {})[int(found["expert"]) if found else 0] = name
    out = {}
    for key, members in merged.items():
        if sorted(members) != list(range(len(members))):
            raise FormatError(f"{key}: experts {sorted(members)} are not numbered 0..{len(members) - 1}: a shard or "
                              f"an expert is missing from the checkpoint")  # fmt: skip
        shapes = {checkpoint.shape(name) for name in members.values()}
        if len(shapes) > 1:
            raise FormatError(f"{key}: experts of different shapes {sorted(shapes)}")
        out[key] = tuple(members[i] for i in range(len(members)))
    return out


def _writing_order(plan: TensorPlan) -> tuple:
    parts = plan.gguf_name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), plan.gguf_name)
    return (0 if parts[0] in ("token_embd", "rope_freqs") else 2, 0, plan.gguf_name)


CHUNK_ELEMENTS = 1 << 22  # convert and quantize 4M values (16 MB in float32) at a time


def convert_tensor(tensor, plan: TensorPlan, arch: Architecture, config: dict) -> np.ndarray:
    """One Hugging Face tensor (torch) as the bytes llama.cpp expects: q/k permuted if needed, then converted to
    float32 (norm offsets applied) and quantized a block of rows at a time, so that a large embedding never exists
    as a whole in float32."""
    if arch.permute_qk and plan.gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        tensor = permute_qk(tensor, config["num_attention_heads"])
    elif arch.permute_qk and plan.gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        tensor = permute_qk(tensor, config.get("num_key_value_heads") or config["num_attention_heads"])
    offset = arch.norm_offset if plan.gguf_name.endswith("norm.weight") else 0.0
    if plan.gguf_name.endswith(arch.row.norm_offset_except):
        offset = 0.0
    rows = tensor.reshape(-1, tensor.shape[-1])
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    out = None
    for start in range(0, rows.shape[0], step):
        part = gguf.quants.quantize(rows[start : start + step].float().numpy() + offset, plan.qtype)
        if out is None:
            out = np.empty((rows.shape[0], part.shape[1]), dtype=part.dtype)
        out[start : start + len(part)] = part
    return out


def write_direct(source: SourceInfo, quant: str, path: Path, split_max_size: int | None,
                 progress: Progress | None):  # fmt: skip
    """Stream the checkpoint into a GGUF file (or shards) with the tensor types of `quant`; return (plan, vocab)."""
    config = text_config(source.config())
    arch = architecture(source.model_type, config)
    vocab = load_vocab(source.path, config["vocab_size"], arch.name)
    checkpoint = Checkpoint(source.path)
    plan = plan_tensors(checkpoint, arch, config, quant)
    generated = extra_tensors(arch, config)

    writer = gguf.GGUFWriter(path, arch.name, split_max_size=split_max_size or 0)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(source.name)  # the model's name: llama.cpp applies family rules by it, never a recipe's
        add_hparams(writer, arch, config)
        writer.add_file_type(file_type(quant))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_to_writer(writer, vocab, source.path)
        for p in plan:
            nbytes = int(np.prod(p.byte_shape))
            writer.add_tensor_info(p.gguf_name, p.byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, p in enumerate(plan):
            tensor = p.read(checkpoint) if p.hf_names else generated[p.gguf_name]
            writer.write_tensor_data(convert_tensor(tensor, p, arch, config))
            if progress:
                progress(i + 1, len(plan), p.gguf_name)
    finally:
        writer.close()  # on every path: an error (disk full, a bad tensor) must not leave the file open
    return plan, vocab


def base_quant(source: SourceInfo, options: Options) -> str:
    """The float type llama.cpp quantizes from: bf16 for bf16 checkpoints (lossless), f16 otherwise."""
    if options.base != "auto":
        return options.base
    return "bf16" if source.dtype == "bfloat16" else "f16"


def model_files(folder: Path) -> list[Path]:
    """The model's GGUF file(s) in a folder, first shard first (an importance matrix beside them is not one)."""
    files = sorted(p for p in folder.glob("*.gguf") if p.name != IMATRIX_FILE)
    if not files:
        raise FileNotFoundError(f"{folder}: no .gguf file")
    return files


class GGUF(Format):
    name = "gguf"
    shares_process = (
        True  # our writer, then llama.cpp through ctypes (releases the GIL): safe beside other targets (pipeline.lanes)
    )
    quants = (*DIRECT, *LLAMA_CPP)
    extra = "gguf"
    library = "gguf"
    options_model = Options
    hardware = {Step.BUILD: ("cpu",), Step.VALIDATE: ("cpu", "cuda")}
    server_script = "llama-server.sh"
    server = "llama.cpp's server"
    options: Options

    @classmethod
    def check_options(cls, quant: str, options: Options) -> None:
        if options.imatrix and quant in DIRECT:
            raise FormatError(f"imatrix applies to llama.cpp-quantized types ({', '.join(LLAMA_CPP)}), not {quant}")
        if options.base != "auto" and quant in DIRECT:
            raise FormatError(f"base applies to llama.cpp-quantized types, not {quant}")

    @property
    def calibrates(self) -> bool:
        return self.options.imatrix

    def missing_dependency(self, step: Step) -> str | None:
        if step == Step.SERVE and not shutil.which("llama-server"):  # the script's fallback: llama-cpp-python's
            return missing_modules({"llama_cpp.server.app": "llama-cpp-python[server]"}, self.extra)
        if step in (Step.VALIDATE, Step.SERVE) or self.quant in LLAMA_CPP:
            return missing_modules({"llama_cpp": "llama-cpp-python"}, self.extra)
        return None

    def needs(self, size: ModelSize, validation: Validation, calibration: Calibration) -> Needs:
        """A streamed build (a tensor at a time, in float32, converted); llama.cpp's quantizer reads a float16 file
        it maps; validation maps the file and keeps a context's logits."""
        file = size.at_bits(GGUF_BITS.get(self.quant, 16))
        logits = 2 * validation.context * size.vocab * 4
        staged = size.at_bits(16) if self.quant in LLAMA_CPP else 0
        return Needs({Step.BUILD: 3 * 4 * size.largest_tensor + staged, Step.VALIDATE: file + logits},
                     disk=file + staged)  # fmt: skip

    def check(self, source: SourceInfo) -> None:
        """Unsupported architecture, rope scaling, tensor or tokenizer: refused before anything is written."""
        config = text_config(source.config())
        arch = architecture(source.model_type, config)
        check_config(arch, config)
        if self.options.imatrix and arch.row.moe:
            raise FormatError("GGUF: the importance matrix is not collected for mixture-of-experts models yet")
        if self.options.imatrix and arch.row.gguf_transforms:
            raise FormatError(f"GGUF: the importance matrix is not carried through {source.model_type}'s tensor "
                              f"transforms ({', '.join(arch.row.gguf_transforms)}) yet")  # fmt: skip
        plan_tensors(Checkpoint(source.path), arch, config, "f16")
        load_vocab(source.path, config["vocab_size"], arch.name)

    def build(self, source: SourceInfo, out_dir: Path, ctx: BuildContext) -> dict[str, Any]:
        stem = f"{ctx.name}-{self.quant.upper()}"
        config = text_config(source.config())
        arch = architecture(source.model_type, config)
        if self.quant in DIRECT:
            plan, vocab = write_direct(source, self.quant, out_dir / f"{stem}.gguf", self.options.split_max_size,
                                       ctx.progress)  # fmt: skip
            info = {"route": "direct", "tensor_types": dict(Counter(p.qtype.name for p in plan))}
        else:
            base = base_quant(source, self.options)
            base_dir = out_dir / ".base"
            base_dir.mkdir()
            plan, vocab = write_direct(source, base, base_dir / f"{ctx.name}-{base.upper()}.gguf",
                                       self.options.split_max_size, ctx.progress)  # fmt: skip
            imatrix = None
            if self.options.imatrix:
                imatrix = importance.compute(source, ctx.calibration, lambda n: gguf_tensor_name(arch, n))
                importance.write(out_dir / IMATRIX_FILE, imatrix)
            types = gguf_quantize.quantize(model_files(base_dir)[0], out_dir / stem, file_type(self.quant), imatrix,
                                           keep_split=self.options.split_max_size is not None)  # fmt: skip
            shutil.rmtree(base_dir)
            info = {"route": "llama.cpp", "base": base, "tensor_types": types,
                    "imatrix": imatrix.describe() if imatrix else None}  # fmt: skip
        files = model_files(out_dir)
        return {
            **info,
            "file": files[0].name,
            "shards": len(files),
            "gguf_arch": arch.name,
            "file_type": file_type(self.quant).name,
            "n_tensors": len(plan),
            "tokenizer": {
                "model": vocab.model,
                "pre": vocab.pre,
                "add_bos": vocab.add_bos,
                "n_tokens": len(vocab.tokens),
            },  # fmt: skip
        }

    def open_runtime(self, artifact: Path, reference, validation: Validation) -> LlamaCppRuntime:
        longest_prompt = max(len(p.ids) for p in reference.prompts) + validation.max_new_tokens
        return LlamaCppRuntime(model_files(artifact)[0], max(max(len(c) for c in reference.chunks), longest_prompt))

    def handoff_files(self, artifact: Path, manifest: Manifest, chat: dict[str, Any]) -> dict[str, str]:
        """An Ollama Modelfile, a LocalAI model config and a llama-server script."""
        file = manifest.build["file"]
        value = handoff.modelfile_value
        lines = ["# Ollama Modelfile (weightsmith)", f"FROM ./{file}"]
        if template := handoff.ollama_template(chat["template"]):
            lines.append(f"TEMPLATE {value(template)}")
            if system := handoff.default_system(chat["template"]):
                lines.append(f"SYSTEM {value(system)}")
        else:
            lines.append("# TEMPLATE: none written; Ollama takes the chat template stored in the GGUF")
        lines += [f"PARAMETER stop {value(s)}" for s in chat["stop"]]
        lines.append(f"PARAMETER num_ctx {chat['context']}")
        localai = {"name": handoff.model_name(manifest), "backend": "llama-cpp", "context_size": chat["context"],
                   "parameters": {"model": file}, "template": {"use_tokenizer_template": True},
                   "stopwords": chat["stop"]}  # fmt: skip
        server = ["llama-server", "-m", file, "--jinja", "-c", str(chat["context"]), "--host", "127.0.0.1", "--port",
                  "8080"]  # fmt: skip
        python = ["$PYTHON", "-m", "llama_cpp.server", "--model", file, "--n_ctx", str(chat["context"]), "--host",
                  "127.0.0.1", "--port", "8080"]  # fmt: skip
        why = "no llama-server binary: the same llama.cpp through pip install 'llama-cpp-python[server]'"
        return {"Modelfile": "\n".join(lines) + "\n", "localai.yaml": yaml.safe_dump(localai, sort_keys=False),
                "llama-server.sh": handoff.script(server, python, why)}  # fmt: skip
