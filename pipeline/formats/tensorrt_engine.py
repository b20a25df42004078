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
it (`pipeline.runtimes.tensorrt_llm`, `pipeline.runtimes.tensorrt`).

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

from pipeline.files import file_sha256
from pipeline.formats.base import engine_not_run
from pipeline.formats.tensorrt_plain import INSTALL as INSTALL_TRT
from pipeline.formats.tensorrt_plain import build_engine as build_plain_engine
from pipeline.runtimes.tensorrt import runtime as plain_engine_runtime
from pipeline.runtimes.tensorrt_llm import EngineRuntime, environment, installed
from pipeline.types import Status

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


def route(options, quant: str, versions: dict[str, str | None]) -> str | tuple[str, str]:
    """The engine builder for this target here, "tensorrt_llm" or "onnx", or (reason code, detail) why none."""
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


def build_and_smoke(artifact_dir: Path, options, quant: str, reference, validation,
                    onnx_dir: Path | str | None) -> dict[str, Any]:  # fmt: skip
    """Build the engine into `artifact_dir/engine` and run it against the reference; `onnx_dir` is the validated
    fp16 standard ONNX artifact the plain route builds from (a string: why there is none)."""
    chosen = probe(options, quant)
    if isinstance(chosen, tuple):
        return engine_not_run(*chosen)
    engine_dir, here = artifact_dir / "engine", environment()
    if chosen == "tensorrt_llm":
        build = partial(build_engine, artifact_dir, engine_dir, options, here)
        runtime = partial(EngineRuntime, engine_dir, here)
    else:
        if not isinstance(onnx_dir, Path):
            return engine_not_run("onnx_artifact_not_ready", str(onnx_dir))
        if validation.context > options.max_input_len:
            return engine_not_run("profile_too_small", f"validation context {validation.context} exceeds "
                                  f"max_input_len {options.max_input_len}: raise max_input_len")  # fmt: skip
        build = partial(build_plain_engine, onnx_dir, engine_dir, options, here)
        runtime = partial(plain_engine_runtime, engine_dir, onnx_dir, here)
    try:
        build_info = {"status": Status.OK, **build()}
    except Exception as exc:  # reported in the manifest; the checkpoint stays valid
        failed = {"status": Status.FAILED, "reason": f"{type(exc).__name__}: {exc}"}
        return {"build": failed, "smoke": {"status": Status.NOT_RUN, "reason": "engine_build_failed",
                                           "detail": str(exc)}}  # fmt: skip
    try:
        from pipeline.validate import smoke_test

        result = smoke_test(runtime(), reference, validation)
        smoke = {"status": Status.OK, "quality": result["quality"], "generation": result["smoke"]["generation"]}
    except Exception as exc:
        smoke = {"status": Status.FAILED, "reason": f"{type(exc).__name__}: {exc}"}
    return {"build": build_info, "smoke": smoke}


def build_engine(checkpoint_dir: Path, engine_dir: Path, options, here: dict[str, Any]) -> dict[str, Any]:
    from pipeline.artifacts import list_files

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
