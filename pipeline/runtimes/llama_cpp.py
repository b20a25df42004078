"""A GGUF file in llama.cpp, through llama-cpp-python (the `gguf` extra)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.hardware import torch_threads
from pipeline.runtimes.base import Runtime


class LlamaCppRuntime(Runtime):
    def __init__(self, path: Path, n_ctx: int):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads collapse on small machines
        import llama_cpp

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
