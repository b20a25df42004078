"""Models in transformers: any torch causal LM behind the Runtime interface, and a GPTQ checkpoint loaded the way
serving stacks load it (transformers' GPTQ loader with GPTQModel's kernels, the independent judge), with a
dequantizing fallback when gptqmodel is not installed."""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.runtimes.base import Runtime


class TorchRuntime(Runtime):
    """A causal LM as torch module, driven through pipeline.validate's Runtime interface."""

    def __init__(self, model, description: dict[str, Any]):
        self.model, self.description = model, description
        self.device = next(model.parameters()).device

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu().numpy()

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        with torch.inference_mode():
            prompt = torch.tensor([ids], device=self.device)
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=sorted(stop_ids) or None,
                                      pad_token_id=next(iter(stop_ids), 0))  # fmt: skip
        return out[0, len(ids) :].tolist()

    def close(self) -> None:
        del self.model


def open_gptq(path: Path) -> TorchRuntime:
    """transformers' own GPTQ loading (the path Xinference and others take), with GPTQModel's kernels: `torch` on
    CPU, which computes with the exact weights; the default GPU kernel on CUDA. Without gptqmodel: dequantizing."""
    try:
        return _transformers_runtime(path)
    except ImportError:
        return _dequantized_runtime(path)


def _transformers_runtime(path: Path) -> TorchRuntime:
    cpu_workers()
    import gptqmodel  # noqa: F401  (transformers' GPTQ loading needs it and optimum; fail here, not half-way)
    import optimum  # noqa: F401
    from transformers import AutoModelForCausalLM, GPTQConfig

    cuda = torch.cuda.is_available()
    bits = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]["bits"]
    # float32 activations on CPU, as the reference runs there: the quality figure should measure the weights
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQConfig(bits=bits, backend=None if cuda
                                                 else "torch"), device_map="cuda" if cuda else "cpu",
                                                 dtype=torch.float16 if cuda else torch.float32)  # fmt: skip
    kernel = type(model.model.layers[0].self_attn.q_proj).__name__
    return TorchRuntime(model.eval(), {
        "runtime": f"transformers {version('transformers')} + gptqmodel {version('gptqmodel')} ({kernel})",
        "device": "cuda" if cuda else "cpu",
        "validated_by": f"transformers {version('transformers')} with gptqmodel {version('gptqmodel')}",
    })  # fmt: skip


def _dequantized_runtime(path: Path) -> TorchRuntime:
    """transformers on weights dequantized with our own unpacking: a weaker check, used only without gptqmodel."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.quantizers.gptq import from_checkpoint

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    bits = config["quantization_config"]["bits"]
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    state = {n: t.float() for n, t in tensors.items() if not n.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    for name in [n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight")]:
        state[f"{name}.weight"] = from_checkpoint({k: tensors[f"{name}.{k}"] for k in
                                                   ("qweight", "qzeros", "scales", "g_idx")}, bits)  # fmt: skip
    plain = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(plain, dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    why = "gptqmodel or optimum is not installed (pip install 'weightsmith[gptq]')"
    return TorchRuntime(model.eval(), {"runtime": "transformers (dequantized by weightsmith)", "device": "cpu",
                                       "validated_by": f"weightsmith's own dequantization: {why}"})  # fmt: skip


def cpu_workers() -> None:
    """GPTQModel refuses to start on 2 cores unless told how many CPU workers it may use."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
