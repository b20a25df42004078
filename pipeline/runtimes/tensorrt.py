"""A TensorRT engine built from the standard ONNX export (`pipeline.formats.tensorrt_plain`), run by the ONNX
runtime's own decode loop (`pipeline.runtimes.onnxruntime.OnnxRuntime`) over `TensorRTSession`, an adapter with
onnxruntime's session surface whose buffers are torch CUDA tensors (no pycuda needed). One execution context per
optimization profile: prefill (a prompt, no cache) and decode (one token after the cache).

Status: TensorRT cannot be installed on the CPU machines this project is developed on, and no GPU was lent to the
sessions that wrote this module, so the session has not run yet; its TensorRT calls are type-checked against
TensorRT 10.13's published stubs (tests/test_tensorrt_plain.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.runtimes.onnxruntime import OnnxRuntime
from pipeline.runtimes.tensorrt_llm import refuse_foreign_engine

PREFILL, DECODE = 0, 1


def profile_for(feeds: dict[str, np.ndarray]) -> int:
    """The optimization profile whose shapes a call of our decode loop has: a prompt without cache, or one token."""
    sequence = feeds["input_ids"].shape[1]
    past = next((a.shape[2] for n, a in feeds.items() if n.startswith("past_key_values.")), 0)
    if past == 0:
        return PREFILL
    if sequence == 1:
        return DECODE
    raise ValueError(f"{sequence} new tokens after {past} cached ones: the engine's profiles take a prompt without "
                     f"cache or one token at a time")  # fmt: skip


def sizes(dims) -> list[int]:
    """A TensorRT Dims as a list (-1 for a dynamic axis)."""
    return [dims[i] for i in range(len(dims))]


class TensorInfo(NamedTuple):
    """What onnxruntime's NodeArg tells about an input or output: -1 for a dynamic axis."""

    name: str
    shape: list[int]
    type: str


class TensorRTSession:
    """A TensorRT engine with onnxruntime's session surface (`get_inputs`, `get_outputs`, `run(None, feeds)`), one
    execution context per optimization profile."""

    def __init__(self, plan: Path):
        import tensorrt as trt
        import torch

        self.torch, self.stream = torch, torch.cuda.Stream()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {plan}: rebuild the engine on this worker")
        self.contexts: list[trt.IExecutionContext] = []
        for index in (PREFILL, DECODE):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts.append(context)
        self.stream.synchronize()
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32}  # fmt: skip
        onnx_types = {torch.float32: "float", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32"}
        self.dtype, self.info = {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self.dtype[name] = dtypes[self.engine.get_tensor_dtype(name)]
            shape = sizes(self.engine.get_tensor_shape(name))
            self.info[name] = TensorInfo(name, shape, f"tensor({onnx_types[self.dtype[name]]})")
        self.input_names = [n for n in self.info if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in self.info if n not in self.input_names]

    def get_inputs(self) -> list[TensorInfo]:
        return [self.info[n] for n in self.input_names]

    def get_outputs(self) -> list[TensorInfo]:
        return [self.info[n] for n in self.output_names]

    def _address(self, tensor, keep: list) -> int:
        """The device address of a tensor; an empty one (the first step's past) gets a one-element buffer, since
        TensorRT wants a valid address for every bound tensor."""
        if tensor.numel():
            return tensor.data_ptr()
        keep.append(self.torch.empty(1, dtype=tensor.dtype, device="cuda"))
        return keep[-1].data_ptr()

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        context, keep = self.contexts[profile_for(feeds)], []
        with torch.cuda.stream(self.stream):
            for name in self.input_names:
                tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", self.dtype[name])
                keep.append(tensor)
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise ValueError(f"input {name} of shape {tuple(tensor.shape)} is outside the engine's profile")
                context.set_tensor_address(name, self._address(tensor, keep))
            outputs = {}
            for name in self.output_names:
                shape = sizes(context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtype[name], device="cuda")
                context.set_tensor_address(name, self._address(outputs[name], keep))
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT failed to run the engine (its log above says why)")
        self.stream.synchronize()
        return [outputs[n].cpu().numpy() for n in (output_names or self.output_names)]


def runtime(engine_dir: Path, onnx_dir: Path, environment: dict[str, Any]):
    """The engine behind pipeline.validate's Runtime interface: the ONNX decode loop over a TensorRT session."""
    refuse_foreign_engine(engine_dir, environment)
    description = {"runtime": f"tensorrt {environment['tensorrt']}", "device": environment["gpu"],
                   "route": "onnx", **environment}  # fmt: skip
    return OnnxRuntime(onnx_dir, session=TensorRTSession(engine_dir / "model.plan"), description=description)
