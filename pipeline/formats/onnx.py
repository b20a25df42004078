"""ONNX, run by onnxruntime (Windows and CPU-only serving, Olive and onnxruntime-genai users, plain TensorRT builds).

Two flavours, chosen by the `flavour` option:

- `standard` (fp32, fp16): a standard-opset graph with the KV cache as explicit inputs and outputs, exported with
  torch's exporter (`onnx_export`) in the model's own mixed precision (norms and softmax upcast as transformers
  computes them). This is the graph a plain TensorRT builder takes; TensorRT builds strongly typed networks (10.12
  deprecated, 11 removed the FP16 builder flag), so an fp16 engine needs the fp16 graph.
- `genai` (fp32, fp16, int4): onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder`), run
  as a subprocess; its graphs use ORT contrib ops (GroupQueryAttention, MatMulNBits) and the folder carries
  `genai_config.json` and the tokenizer, so `onnxruntime_genai.Model` runs it as it is.

The smoke test uses onnxruntime's InferenceSession on the worker's execution provider (CUDA when installed, else CPU)
for the logits of whole sequences, and for greedy generation either our decode loop with the KV cache fed back
(`standard`) or onnxruntime-genai's own generator and tokenizer (`genai`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.formats import FormatError

QUANTS = ("fp32", "fp16", "int4")
EXTRA = "onnx"
HARDWARE = {"build": ("cpu", "cuda"), "smoke": ("cuda", "cpu")}
GENAI_SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")


class Options(BaseModel):
    """Target options for ONNX."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flavour: Literal["auto", "standard", "genai"] = "auto"  # auto: standard for fp32, genai otherwise
    execution_provider: Literal["cpu", "cuda"] = "cpu"  # what the genai builder optimises the graph for
    block_size: Literal[16, 32, 64, 128, 256] = 32  # int4: weights sharing one scale (MatMulNBits block)


def flavour(quant: str, options: Options) -> str:
    return ("standard" if quant == "fp32" else "genai") if options.flavour == "auto" else options.flavour


STANDARD_QUANTS = ("fp32", "fp16")


def check_options(quant: str, options: Options) -> None:
    if flavour(quant, options) == "standard" and quant not in STANDARD_QUANTS:
        raise FormatError(f"the standard ONNX export is fp32 or fp16; use flavour genai for {quant}")


def missing_dependency(step: str, target) -> str | None:
    needed = ["onnx", "onnxruntime"]
    if flavour(target.quant, Options.model_validate(target.options)) == "genai":
        needed += ["onnxruntime_genai", "onnx_ir"]
    elif step == "build":
        needed += ["onnxscript"]  # torch's exporter
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: pip install 'weightsmith[{EXTRA}]'"
    return None


def check(source, target) -> None:
    options = Options.model_validate(target.options)
    check_options(target.quant, options)
    if flavour(target.quant, options) == "genai" and source.model_type not in GENAI_SUPPORTED:
        raise FormatError(f"onnxruntime-genai's builder is not set up here for {source.model_type!r} "
                          f"(supported: {', '.join(GENAI_SUPPORTED)})")  # fmt: skip


def build(source, target, out_dir: Path, *, name: str, progress=None, calibration=None) -> dict[str, Any]:
    from pipeline.formats import onnx_export

    options = Options.model_validate(target.options)
    kind = flavour(target.quant, options)
    if kind == "standard":
        facts = onnx_export.export(source.path, out_dir, source.trust_remote_code, target.quant)
        _copy_tokenizer(source, out_dir)
        return {"flavour": kind, "precision": target.quant, **facts}
    log = _run_genai_builder(source, target.quant, options, out_dir)
    _copy_tokenizer(source, out_dir)
    config = json.loads((out_dir / "genai_config.json").read_text(encoding="utf-8"))
    decoder = config["model"]["decoder"]
    return {
        "flavour": kind,
        "precision": target.quant,
        "execution_provider": options.execution_provider,
        "block_size": options.block_size if target.quant == "int4" else None,
        "n_layers": decoder["num_hidden_layers"],
        "inputs": decoder["inputs"],
        "builder_log_tail": log[-600:],
    }


def _copy_tokenizer(source, out_dir: Path) -> None:
    """The source's own tokenizer files travel with the graph. (The genai builder re-saves the tokenizer
    AutoTokenizer gave it, which for some configs is a model-specific class with another pre-tokenizer.)"""
    for name in source.tokenizer_files:
        shutil.copy(source.path / name, out_dir / name)


def _run_genai_builder(source, quant: str, options: Options, out_dir: Path) -> str:
    from pipeline.source import portable_config

    cache = out_dir.parent / f".{out_dir.name}.genai-cache"
    shadow = out_dir.parent / f".{out_dir.name}.genai-source"
    try:
        shadow.mkdir()
        for item in source.path.iterdir():  # the builder reads config.json through transformers 4-style keys
            if item.name != "config.json":
                (shadow / item.name).symlink_to(item.resolve())
        config = portable_config(json.loads((source.path / "config.json").read_text(encoding="utf-8")))
        (shadow / "config.json").write_text(json.dumps(config), encoding="utf-8")
        extra = ["int4_accuracy_level=4", f"int4_block_size={options.block_size}"] if quant == "int4" else []
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(shadow), "-o", str(out_dir),
               "-p", quant, "-e", options.execution_provider, "-c", str(cache)]  # fmt: skip
        if extra:
            cmd += ["--extra_options", *extra]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not (out_dir / "genai_config.json").is_file():
            raise FormatError(f"onnxruntime-genai's builder failed: {run.stderr.strip()[-800:]}")
        return run.stdout + run.stderr
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(shadow, ignore_errors=True)


def smoke(artifact_dir: Path, reference, validation) -> dict[str, Any]:
    from pipeline.validate import smoke_test

    runtime = OnnxRuntime(artifact_dir)
    return smoke_test(runtime, reference, validation)


def execution_provider() -> str:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"


class OnnxRuntime:
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
