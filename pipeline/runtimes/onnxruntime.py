"""An ONNX artifact in onnxruntime (on the worker's execution provider: CUDA when installed, else CPU): logits of
whole sequences, and greedy generation either by our decode loop with the KV cache fed back (the standard flavour)
or by onnxruntime-genai's own generator and tokenizer (the genai flavour)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.runtimes.base import Runtime


def execution_provider() -> str:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"


class OnnxRuntime(Runtime):
    """An ONNX artifact in onnxruntime, driven through pipeline.validate's Runtime interface.

    `session` replaces onnxruntime's with another runtime of the same graph (a TensorRT engine built from it, see
    `pipeline.formats.tensorrt_plain`): anything with onnxruntime's `get_inputs()`, `get_outputs()` (objects with
    `name`, `shape`, `type`) and `run(None, feeds)`, described by `description`."""

    def __init__(self, path: Path, session=None, description: dict[str, Any] | None = None):
        self.path = path
        self.genai = (path / "genai_config.json").is_file()
        if session is None:
            session, description = self._onnxruntime_session()
        self.session = session
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.dtype = np.float16 if "float16" in self.inputs[self.past_names[0]].type else np.float32
        self.empty_past = self._empty_past_shape()
        self.description = description

    def _onnxruntime_session(self):
        import onnxruntime

        provider = execution_provider()
        session = onnxruntime.InferenceSession(str(self.path / "model.onnx"), providers=[provider])
        return session, {
            "runtime": f"onnxruntime {onnxruntime.__version__}" + (" + onnxruntime-genai" if self.genai else ""),
            "device": "cuda" if provider.startswith("CUDA") else "cpu",
            "execution_provider": provider,
            "flavour": "genai" if self.genai else "standard",
        }

    def _feeds(self, ids: list[int], past: dict[str, np.ndarray] | None, start: int) -> dict[str, np.ndarray]:
        total = start + len(ids)
        feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, total), dtype=np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(start, total, dtype=np.int64)[None]
        for name in self.past_names:
            if past is not None:
                feeds[name] = past[name]
            else:
                feeds[name] = np.zeros(self.empty_past, dtype=self.dtype)
        return feeds

    def _empty_past_shape(self) -> tuple[int, int, int, int]:
        _, kv_heads, _, head_dim = self.inputs[self.past_names[0]].shape
        if not isinstance(head_dim, int):  # the genai graph names this axis; its config has the size
            decoder = json.loads((self.path / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
            kv_heads, head_dim = decoder["num_key_value_heads"], decoder["head_size"]
        return (1, kv_heads, 0, head_dim)

    def _run(self, ids: list[int], past=None, start: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        names = [o.name for o in self.session.get_outputs()]
        outputs = dict(zip(names, self.session.run(None, self._feeds(ids, past, start))))
        present = {n.replace("past_key_values.", "present."): n for n in self.past_names}
        return outputs["logits"][0].astype(np.float32), {p: outputs[o] for o, p in present.items()}

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._run(ids)[0]

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        if self.genai:
            return self._genai_greedy(ids, max_new_tokens, stop_ids)
        logits, past = self._run(ids)
        out: list[int] = []
        while True:  # our decode loop: the cache from each step is fed back as the next step's past
            out.append(int(logits[-1].argmax()))
            if out[-1] in stop_ids or len(out) >= max_new_tokens:
                return out
            logits, past = self._run([out[-1]], past, len(ids) + len(out) - 1)

    def _genai_greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        import onnxruntime_genai as og

        model = self._genai_model()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        out: list[int] = []
        while not generator.is_done() and len(out) < max_new_tokens:
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
            if out[-1] in stop_ids:
                break
        return out

    def _genai_model(self):
        import onnxruntime_genai as og

        if not hasattr(self, "_model"):
            self._model = og.Model(str(self.path))
        return self._model

    def tokenize(self, text: str) -> list[int] | None:
        if not self.genai:
            return None  # the standard flavour ships the source's Hugging Face tokenizer files unchanged
        import onnxruntime_genai as og

        return [int(t) for t in og.Tokenizer(self._genai_model()).encode(text)]

    def chat_template(self) -> dict[str, str] | None:
        return None  # the tokenizer files (and any template) are the source's own, checked against the source
