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

Architecture and tokenizer tables live in `gguf_arch` and `gguf_vocab`. The smoke test runs the file in llama.cpp
itself, through llama-cpp-python (the `gguf` extra).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType
from pydantic import BaseModel, ConfigDict, field_validator

from pipeline.formats import FormatError, parse_size
from pipeline.formats.gguf_arch import Architecture, add_hparams, architecture, extra_tensors, permute_qk
from pipeline.formats.gguf_arch import tensor_name as gguf_tensor_name
from pipeline.formats.gguf_vocab import add_to_writer, load_vocab

# recipe quant -> route. Direct quants name the tensor type of their weight matrices; llama.cpp quants are named
# after llama.cpp's file types (q4_k_m -> LLAMA_FTYPE_MOSTLY_Q4_K_M).
DIRECT = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
LLAMA_CPP = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
             "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")  # fmt: skip
QUANTS = (*DIRECT, *LLAMA_CPP)
EXTRA = "gguf"
HARDWARE = {"build": ("cpu",), "smoke": ("cpu", "cuda")}
IMATRIX_FILE = "imatrix.gguf"

Progress = Callable[[int, int, str], None]


class Options(BaseModel):
    """Target options for GGUF."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    imatrix: bool = False  # quantize with an importance matrix from the recipe's calibration text (llama.cpp route)
    base: Literal["auto", "f32", "f16", "bf16"] = "auto"  # the file llama.cpp quantizes from (auto: bf16 for bf16)
    split_max_size: int | None = None  # bytes per file; larger outputs become llama.cpp's -0000N-of-0000M shards

    @field_validator("split_max_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value)


def file_type(quant: str) -> LlamaFileType:
    return LlamaFileType.ALL_F32 if quant == "f32" else LlamaFileType[f"MOSTLY_{quant.upper()}"]


def check_options(quant: str, options: Options) -> None:
    if options.imatrix and quant in DIRECT:
        raise FormatError(f"imatrix applies to llama.cpp-quantized types ({', '.join(LLAMA_CPP)}), not {quant}")
    if options.base != "auto" and quant in DIRECT:
        raise FormatError(f"base applies to llama.cpp-quantized types, not {quant}")


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str | None  # None for tensors llama.cpp needs that the checkpoint does not hold (see extra_tensors)
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Q

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)


def missing_dependency(step: str, target) -> str | None:
    if step == "smoke" or target.quant in LLAMA_CPP:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return f"llama-cpp-python is not installed: pip install 'weightsmith[{EXTRA}]'"
    return None


def check(source, target) -> None:
    """Fail before anything is written: bad options, unsupported architecture, rope scaling, tensor or tokenizer."""
    from pipeline.source import Checkpoint

    check_options(target.quant, Options.model_validate(target.options))
    config = source.config()
    arch = architecture(source.model_type)
    plan_tensors(Checkpoint(source.path), arch, config, "f16")
    load_vocab(source.path, config["vocab_size"])


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> Q:
    """The GGML type of one tensor in a direct file of the given quant, as llama.cpp's converter chooses it."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    qtype = DIRECT[quant]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block_size == 0 else Q.F16


def plan_tensors(checkpoint, arch: Architecture, config: dict, quant: str) -> list[TensorPlan]:
    plan = []
    for hf_name in checkpoint.names():
        name = gguf_tensor_name(arch, hf_name)
        if name is not None:
            shape = checkpoint.shape(hf_name)
            plan.append(TensorPlan(hf_name, name, shape, tensor_type(name, shape, quant)))
    for name, tensor in extra_tensors(arch, config).items():
        plan.append(TensorPlan(None, name, tuple(tensor.shape), Q.F32))
    return sorted(plan, key=_writing_order)


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
    rows = tensor.reshape(-1, tensor.shape[-1])
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    out = None
    for start in range(0, rows.shape[0], step):
        part = gguf.quants.quantize(rows[start : start + step].float().numpy() + offset, plan.qtype)
        if out is None:
            out = np.empty((rows.shape[0], part.shape[1]), dtype=part.dtype)
        out[start : start + len(part)] = part
    return out


def write_direct(source, quant: str, path: Path, name: str, split_max_size: int | None, progress: Progress | None):
    """Stream the checkpoint into a GGUF file (or shards) with the tensor types of `quant`; return (plan, vocab)."""
    from pipeline.source import Checkpoint

    config = source.config()
    arch = architecture(source.model_type)
    vocab = load_vocab(source.path, config["vocab_size"])
    checkpoint = Checkpoint(source.path)
    plan = plan_tensors(checkpoint, arch, config, quant)
    generated = extra_tensors(arch, config)

    writer = gguf.GGUFWriter(path, arch.name, split_max_size=split_max_size or 0)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
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
        tensor = generated[p.gguf_name] if p.hf_name is None else checkpoint.tensor(p.hf_name)
        writer.write_tensor_data(convert_tensor(tensor, p, arch, config))
        if progress:
            progress(i + 1, len(plan), p.gguf_name)
    writer.close()
    return plan, vocab


def base_quant(source, options: Options) -> str:
    """The float type llama.cpp quantizes from: bf16 for bf16 checkpoints (lossless), f16 otherwise."""
    if options.base != "auto":
        return options.base
    return "bf16" if source.dtype == "bfloat16" else "f16"


def build(source, target, out_dir: Path, *, name: str, progress: Progress | None = None, calibration=None):
    from pipeline.formats import gguf_quantize

    options = Options.model_validate(target.options)
    check_options(target.quant, options)
    stem = f"{name}-{target.quant.upper()}"
    if target.quant in DIRECT:
        plan, vocab = write_direct(source, target.quant, out_dir / f"{stem}.gguf", name, options.split_max_size,
                                   progress)  # fmt: skip
        info = {"route": "direct", "tensor_types": dict(Counter(p.qtype.name for p in plan))}
    else:
        base = base_quant(source, options)
        base_dir = out_dir / ".base"
        base_dir.mkdir()
        plan, vocab = write_direct(source, base, base_dir / f"{name}-{base.upper()}.gguf", name,
                                   options.split_max_size, progress)  # fmt: skip
        imatrix = None
        if options.imatrix:
            from pipeline.formats import gguf_imatrix

            imatrix = gguf_imatrix.for_source(source, calibration)
            gguf_imatrix.write(out_dir / IMATRIX_FILE, imatrix)
        types = gguf_quantize.quantize(model_files(base_dir)[0], out_dir / stem, file_type(target.quant), imatrix,
                                       keep_split=options.split_max_size is not None)  # fmt: skip
        shutil.rmtree(base_dir)
        info = {"route": "llama.cpp", "base": base, "tensor_types": types,
                "imatrix": imatrix.describe() if imatrix else None}  # fmt: skip
    files = model_files(out_dir)
    return {
        **info,
        "file": files[0].name,
        "shards": len(files),
        "gguf_arch": architecture(source.model_type).name,
        "file_type": file_type(target.quant).name,
        "n_tensors": len(plan),
        "tokenizer": {"model": vocab.model, "pre": vocab.pre, "add_bos": vocab.add_bos, "n_tokens": len(vocab.tokens)},
    }


def model_files(folder: Path) -> list[Path]:
    """The model's GGUF file(s) in a folder, first shard first (an importance matrix beside them is not one)."""
    files = sorted(p for p in folder.glob("*.gguf") if p.name != IMATRIX_FILE)
    if not files:
        raise FileNotFoundError(f"{folder}: no .gguf file")
    return files


def smoke(artifact_dir: Path, reference, validation) -> dict[str, Any]:
    from pipeline.validate import smoke_test

    n_ctx = max(
        max(len(c) for c in reference.chunks), max(len(p.ids) for p in reference.prompts) + validation.max_new_tokens
    )
    runtime = LlamaCppRuntime(model_files(artifact_dir)[0], n_ctx)
    try:
        return smoke_test(runtime, reference, validation)
    finally:
        runtime.close()


class LlamaCppRuntime:
    """A GGUF file loaded in llama.cpp (llama-cpp-python), driven through pipeline.validate's Runtime interface."""

    def __init__(self, path: Path, n_ctx: int):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads collapse on small machines
        import llama_cpp

        from pipeline.hardware import torch_threads

        threads = torch_threads()
        self.llm = llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, logits_all=True, verbose=False
        )
        self.description = {
            "runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            "device": "cpu" if not llama_cpp.llama_supports_gpu_offload() else "gpu-capable build",
            "threads": threads,
        }

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(token)
            if token in stop_ids or len(out) >= max_new_tokens:
                break
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def chat_template(self) -> dict[str, str] | None:
        metadata = self.llm.metadata
        template = metadata.get("tokenizer.chat_template")
        if template is None:
            return None

        def token(key: str) -> str:
            tid = metadata.get(key)
            return self.llm.detokenize([int(tid)], special=True).decode("utf-8") if tid is not None else ""

        return {
            "template": template,
            "bos_token": token("tokenizer.ggml.bos_token_id"),
            "eos_token": token("tokenizer.ggml.eos_token_id"),
        }

    def close(self) -> None:
        self.llm.close()
