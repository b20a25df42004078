"""GGUF, llama.cpp's format (llama.cpp, Ollama, LocalAI, LM Studio, llama-server).

Written with gguf-py's `GGUFWriter`, streaming: the tensor table is planned from the safetensors headers alone, then
each tensor is read, converted and written in turn, so peak memory is about one tensor rather than the model.
Tensor types follow llama.cpp's own converter (`convert_hf_to_gguf.py`) so that the tensor bytes are the same:
1-D tensors, norms and biases stay F32, and a matrix whose rows are not a multiple of the quant block falls back to
F16. Q8_0 and Q4_0 use gguf-py's numpy quantizers, which reproduce ggml's C reference bit for bit (checked in the
tests). Architecture and tokenizer tables live in `gguf_arch` and `gguf_vocab`.

The smoke test runs the file in llama.cpp itself, through llama-cpp-python (the `gguf` extra).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from pipeline.formats.gguf_arch import Architecture, add_hparams, architecture, permute_qk, rope_scaling, tensor_name
from pipeline.formats.gguf_vocab import add_to_writer, load_vocab

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
EXTRA = "gguf"
HARDWARE = {"build": ("cpu",), "smoke": ("cpu", "cuda")}

# recipe quant -> (GGUF file type, tensor type of the weight matrices)
QUANT_TYPES = {
    "f32": (LlamaFileType.ALL_F32, Q.F32),
    "f16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
}

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Q

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)


def missing_dependency(step: str) -> str | None:
    if step == "smoke":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return f"llama-cpp-python is not installed: pip install 'weightsmith[{EXTRA}]'"
    return None


def check(source, target) -> None:
    """Fail before anything is written: unsupported architecture, rope scaling, tensor or tokenizer."""
    from pipeline.source import Checkpoint

    config = source.config()
    arch = architecture(source.model_type)
    rope_scaling(config)
    plan_tensors(Checkpoint(source.path), arch, target.quant)
    load_vocab(source.path, config["vocab_size"])


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> Q:
    """The GGML type of one tensor in a file of the given quant, as llama.cpp's converter chooses it."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    qtype = QUANT_TYPES[quant][1]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block_size == 0 else Q.F16


def plan_tensors(checkpoint, arch: Architecture, quant: str) -> list[TensorPlan]:
    plan = []
    for hf_name in checkpoint.names():
        gguf_name = tensor_name(arch, hf_name)
        if gguf_name is not None:
            shape = checkpoint.shape(hf_name)
            plan.append(TensorPlan(hf_name, gguf_name, shape, tensor_type(gguf_name, shape, quant)))
    return sorted(plan, key=_writing_order)


def _writing_order(plan: TensorPlan) -> tuple:
    parts = plan.gguf_name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), plan.gguf_name)
    return (0 if parts[0] == "token_embd" else 2, 0, plan.gguf_name)


CHUNK_ELEMENTS = 1 << 22  # convert and quantize 4M values (16 MB in float32) at a time


def convert_tensor(tensor, plan: TensorPlan, arch: Architecture, config: dict) -> np.ndarray:
    """One Hugging Face tensor (torch) as the bytes llama.cpp expects: q/k permuted if needed, then converted to
    float32 and quantized a block of rows at a time, so that a large embedding never exists as a whole in float32."""
    if arch.permute_qk and plan.gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        tensor = permute_qk(tensor, config["num_attention_heads"])
    elif arch.permute_qk and plan.gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        tensor = permute_qk(tensor, config.get("num_key_value_heads") or config["num_attention_heads"])
    rows = tensor.reshape(-1, tensor.shape[-1])
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    out = None
    for start in range(0, rows.shape[0], step):
        part = gguf.quants.quantize(rows[start : start + step].float().numpy(), plan.qtype)
        if out is None:
            out = np.empty((rows.shape[0], part.shape[1]), dtype=part.dtype)
        out[start : start + len(part)] = part
    return out


def build(source, target, out_dir: Path, *, name: str, progress: Progress | None = None) -> dict[str, Any]:
    from pipeline.source import Checkpoint

    config = source.config()
    arch = architecture(source.model_type)
    vocab = load_vocab(source.path, config["vocab_size"])
    checkpoint = Checkpoint(source.path)
    plan = plan_tensors(checkpoint, arch, target.quant)
    file_type = QUANT_TYPES[target.quant][0]
    path = out_dir / f"{name}-{target.quant.upper()}.gguf"

    writer = gguf.GGUFWriter(path, arch.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_hparams(writer, arch, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_to_writer(writer, vocab, source.path)
    for p in plan:
        writer.add_tensor_info(
            p.gguf_name, p.byte_shape, np.dtype(np.uint8), int(np.prod(p.byte_shape)), raw_dtype=p.qtype
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, p in enumerate(plan):
        writer.write_tensor_data(convert_tensor(checkpoint.tensor(p.hf_name), p, arch, config))
        if progress:
            progress(i + 1, len(plan), p.gguf_name)
    writer.close()
    return {
        "file": path.name,
        "gguf_arch": arch.name,
        "file_type": file_type.name,
        "tensor_types": dict(Counter(p.qtype.name for p in plan)),
        "n_tensors": len(plan),
        "tokenizer": {"model": vocab.model, "pre": vocab.pre, "add_bos": vocab.add_bos, "n_tokens": len(vocab.tokens)},
    }


def gguf_file(artifact_dir: Path) -> Path:
    files = sorted(artifact_dir.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{artifact_dir}: no .gguf file")
    return files[0]


def smoke(artifact_dir: Path, reference, validation) -> dict[str, Any]:
    from pipeline.validate import smoke_test

    n_ctx = max(
        max(len(c) for c in reference.chunks), max(len(p.ids) for p in reference.prompts) + validation.max_new_tokens
    )
    runtime = LlamaCppRuntime(gguf_file(artifact_dir), n_ctx)
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
