"""The engine steps of the tensorrt format on a CUDA worker: which builder (`route`), and the TensorRT-LLM one.

Routes: TensorRT-LLM 1.2.x (the last line with `trtllm-build`; 1.4 dropped the TensorRT engine backend for its
PyTorch one) from the prepared checkpoint, or plain TensorRT from the recipe's fp16 standard ONNX export
(`pipeline.formats.tensorrt_plain`). Before building: a CUDA device, a compute capability TensorRT builds for, the
route's library importable (TensorRT-LLM needs the NVIDIA driver) in the version the recipe pins. Anything missing
gives a reason code and no engine file.
The build applies TensorRT-LLM's own `preprocess_weights_for_mixed_gemm` to weight-only tensors (the prepared
checkpoint keeps them unprocessed, see `pipeline.formats.tensorrt`), runs `trtllm-build`, and writes the engine and
`engine.json` (versions, GPU, compute capability, build options, checkpoint and engine hashes) into
`<artifact>/engine/`. The smoke test refuses an engine built for another GPU or TensorRT(-LLM) version, then runs
it with TensorRT-LLM's `ModelRunner` (context logits for the quality figures, greedy generation for the prompts).

Status: this module has not yet run on a GPU in this project's sessions (none was lent so far); on CPU machines
only `probe` and `route` run, and they are tested.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.formats import engine_not_run

INSTALL = "pip install 'tensorrt-llm==1.2.*' --extra-index-url https://pypi.nvidia.com (on a CUDA machine)"
MIN_CAPABILITY = (7, 5)


def probe(options, quant: str = "fp16") -> str | tuple[str, str]:
    """The engine builder to use here (see `route`), or (reason code, detail) why no engine can be built here."""
    import torch

    if not torch.cuda.is_available():
        return "no_cuda_device", "torch sees no CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return "compute_capability_unsupported", f"{torch.cuda.get_device_name()} is sm{capability[0]}{capability[1]}"
    return route(options, quant, installed())


def installed() -> dict[str, str | None]:
    """The versions of TensorRT-LLM and TensorRT importable here (None: not importable)."""
    versions: dict[str, str | None] = {}
    for module in ("tensorrt_llm", "tensorrt"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # ImportError, or a library that needs a driver this machine lacks
            versions[module] = None
    return versions


def route(options, quant: str, versions: dict[str, str | None]) -> str | tuple[str, str]:
    """The engine builder for this target here, "tensorrt_llm" or "onnx", or (reason code, detail) why none."""
    from pipeline.formats.tensorrt_plain import INSTALL as INSTALL_TRT

    llm, trt = versions.get("tensorrt_llm"), versions.get("tensorrt")
    if options.engine_route == "tensorrt_llm" or (options.engine_route == "auto" and (llm or not options.onnx_target)):
        if not llm:
            plain = " (or set onnx_target to build fp16 with plain TensorRT)" if quant == "fp16" else ""
            if options.onnx_target:
                plain = f" (or set engine_route auto to build with plain TensorRT from {options.onnx_target})"
            return "tensorrt_llm_not_installed", f"TensorRT-LLM is not importable here{plain}; {INSTALL}"
        if not llm.startswith(options.tensorrt_llm):
            return "tensorrt_llm_version_mismatch", f"installed {llm}, recipe pins {options.tensorrt_llm}"
        return "tensorrt_llm"
    if not trt:
        return "tensorrt_not_installed", f"neither TensorRT-LLM nor TensorRT is importable here; {INSTALL_TRT}"
    if not trt.startswith(options.tensorrt):
        return "tensorrt_version_mismatch", f"installed TensorRT {trt}, recipe pins {options.tensorrt}"
    return "onnx"


def build_and_smoke(artifact_dir: Path, options, quant: str, reference, validation) -> dict[str, Any]:
    from pipeline.formats import FormatError, tensorrt_plain
    from pipeline.formats.tensorrt import onnx_artifact

    chosen = probe(options, quant)
    if isinstance(chosen, tuple):
        return engine_not_run(*chosen)
    engine_dir, here = artifact_dir / "engine", environment()
    if chosen == "tensorrt_llm":
        build = partial(build_engine, artifact_dir, engine_dir, options, here)
        runtime = partial(EngineRuntime, engine_dir, here)
    else:
        try:
            onnx_dir = onnx_artifact(artifact_dir.parent, options.onnx_target)
        except FormatError as exc:
            return engine_not_run("onnx_artifact_not_ready", str(exc))
        if validation.context > options.max_input_len:
            return engine_not_run("profile_too_small", f"validation context {validation.context} exceeds "
                                  f"max_input_len {options.max_input_len}: raise max_input_len")  # fmt: skip
        build = partial(tensorrt_plain.build_engine, onnx_dir, engine_dir, options, here)
        runtime = partial(tensorrt_plain.runtime, engine_dir, onnx_dir, here)
    try:
        build_info = {"status": "ok", **build()}
    except Exception as exc:  # reported in the manifest; the checkpoint stays valid
        failed = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        return {"build": failed, "smoke": {"status": "not_run", "reason": "engine_build_failed", "detail": str(exc)}}
    try:
        from pipeline.validate import smoke_test

        result = smoke_test(runtime(), reference, validation)
        smoke = {"status": "ok", "quality": result["quality"], "generation": result["smoke"]["generation"]}
    except Exception as exc:
        smoke = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    return {"build": build_info, "smoke": smoke}


def environment() -> dict[str, Any]:
    """This worker's GPU and library versions, as an engine's engine.json records them."""
    import torch

    capability = torch.cuda.get_device_capability()
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    return {**installed(), "cuda_runtime": torch.version.cuda, "driver": driver, "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{capability[0]}.{capability[1]}"}  # fmt: skip


def refuse_foreign_engine(engine_dir: Path, here: dict[str, Any]) -> None:
    """Raise unless the engine was built for this worker's GPU and the TensorRT(-LLM) version it has: engines are
    bound to both."""
    info = json.loads((engine_dir / "engine.json").read_text(encoding="utf-8"))
    built = info["environment"]
    keys = ("gpu", "compute_capability", "tensorrt") + (("tensorrt_llm",) if info.get("route") != "onnx" else ())
    for key in keys:
        if here.get(key) != built.get(key):
            raise RuntimeError(f"engine built for {key} {built.get(key)}, this worker has {here.get(key)}: rebuild "
                               f"it here")  # fmt: skip


def build_engine(checkpoint_dir: Path, engine_dir: Path, options, here: dict[str, Any]) -> dict[str, Any]:
    from pipeline.artifacts import list_files
    from pipeline.source import file_sha256

    config = json.loads((checkpoint_dir / "config.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(dir=checkpoint_dir.parent) as tmp:
        processed, staged = Path(tmp, "checkpoint"), Path(tmp, "engine")
        processed.mkdir()
        _preprocess(checkpoint_dir, processed, config)
        flags = [
            "--max_batch_size",
            options.max_batch_size,
            "--max_input_len",
            options.max_input_len,
            "--max_seq_len",
            options.max_seq_len,
            "--gemm_plugin",
            options.gemm_plugin,
            "--gather_context_logits",
        ]
        subprocess.run(["trtllm-build", "--checkpoint_dir", processed, "--output_dir", staged, *map(str, flags)],
                       check=True)  # fmt: skip
        info = {
            "route": "tensorrt_llm",
            "environment": here,
            "build_options": options.model_dump(),
            "dtype": config["dtype"],
            "quant_algo": config["quantization"]["quant_algo"],
            "hardware_compatible": False,
            "version_compatible": False,
            "checkpoint_sha256": file_sha256(checkpoint_dir / "rank0.safetensors"),
        }
        info["engine_files"] = [entry.model_dump() for entry in list_files(staged)]
        (staged / "engine.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        shutil.rmtree(engine_dir, ignore_errors=True)
        staged.rename(engine_dir)
    for file in checkpoint_dir.iterdir():  # the runner reads the tokenizer beside the engine
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            shutil.copy(file, engine_dir / file.name)
    return info


def _preprocess(source: Path, target: Path, config: dict) -> None:
    """TensorRT-LLM's interleaving of weight-only tensors for this GPU (what its own converters do at convert time)."""
    import torch
    from safetensors.torch import load_file, save_file

    algo = config["quantization"]["quant_algo"]
    tensors = load_file(source / "rank0.safetensors")
    if algo in ("W8A16", "W4A16", "W4A16_GPTQ"):
        kind = torch.int8 if algo == "W8A16" else torch.quint4x2
        activation = torch.bfloat16 if config["dtype"] == "bfloat16" else torch.float16
        for name, tensor in tensors.items():
            if name.endswith(".weight") and tensor.dtype == torch.int8:
                processed = torch.ops.trtllm.preprocess_weights_for_mixed_gemm(tensor.contiguous(), kind, activation)
                tensors[name] = processed.view(activation) if algo == "W4A16_GPTQ" else processed
    save_file(tensors, target / "rank0.safetensors")
    (target / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


class EngineRuntime:
    """A built engine through TensorRT-LLM's ModelRunner, behind pipeline.validate's Runtime interface."""

    def __init__(self, engine_dir: Path, here: dict[str, Any]):
        """`here`: this worker's `environment()`."""
        from tensorrt_llm.runtime import ModelRunner

        refuse_foreign_engine(engine_dir, here)

        self.runner = ModelRunner.from_dir(engine_dir=str(engine_dir), rank=0)
        self.description = {"runtime": f"tensorrt-llm {here['tensorrt_llm']}", "device": here["gpu"], **here}

    def _generate(self, ids: list[int], max_new_tokens: int, end_id: int):
        import torch

        return self.runner.generate([torch.tensor(ids, dtype=torch.int32)], max_new_tokens=max_new_tokens,
                                    end_id=end_id, pad_id=end_id, temperature=1.0, top_k=1,
                                    output_generation_logits=False, output_sequence_lengths=True,
                                    return_dict=True)  # fmt: skip

    def logits(self, ids: list[int]) -> np.ndarray:
        out = self._generate(ids, 1, -1)
        return out["context_logits"][0].float().cpu().numpy()

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        out = self._generate(ids, max_new_tokens, min(stop_ids) if stop_ids else -1)
        length = int(out["sequence_lengths"][0][0])
        return out["output_ids"][0][0][len(ids) : length].tolist()

    def tokenize(self, text: str) -> None:
        return None

    def chat_template(self) -> None:
        return None
