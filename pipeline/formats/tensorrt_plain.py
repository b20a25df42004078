"""Plain TensorRT: an engine built from the recipe's standard ONNX export, for CUDA workers that have TensorRT but
not TensorRT-LLM (or a model TensorRT-LLM's checkpoint route does not cover).

The build parses the fp16 standard export (`pipeline.formats.onnx`, option `onnx_target` of the tensorrt target)
with TensorRT's ONNX parser into a strongly typed network: TensorRT 10.12 deprecated and 11 removed the precision
builder flags, so the engine computes in the graph's own precision. Two optimization profiles, one per phase of
our decode loop, each consistent at its corners (total = past + sequence, which the attention's broadcasts need):

    prefill  sequence_length 1..max_input_len, past_sequence_length 0, total_sequence_length 1..max_input_len
    decode   sequence_length 1, past_sequence_length 0..max_seq_len-1, total_sequence_length 1..max_seq_len

with batch 1..max_batch_size in both. The smoke test runs the ONNX smoke test's own decode loop
(`pipeline.formats.onnx.OnnxRuntime`) over `TensorRTSession`, an adapter with onnxruntime's session surface whose
buffers are torch CUDA tensors (no pycuda needed).

Status: TensorRT cannot be installed on the CPU machines this project is developed on (its libraries come from
NVIDIA's index), and no GPU was lent to the sessions that wrote this module, so the build and the session have not
run yet. On CPU only the profile computation runs; it is tested on real exports, and the TensorRT calls are
type-checked against TensorRT 10.13's published stubs (`tensorrt-stubs`, see tests/test_tensorrt_plain.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

INSTALL = "pip install 'tensorrt-cu12==10.*' --extra-index-url https://pypi.nvidia.com (on a CUDA machine)"
PREFILL, DECODE = 0, 1
Shape = tuple[int, ...]


def graph_inputs(onnx_path: Path) -> dict[str, list[int | str]]:
    """The graph's inputs and their axes: a size, or the name of a dynamic axis."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


def profiles(inputs: dict[str, list[int | str]], options) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """(min, opt, max) shapes of every input for the prefill and the decode profile (see the module docstring)."""
    batch, prompt, seq = options.max_batch_size, options.max_input_len, options.max_seq_len
    axes = [
        {"batch": (1, 1, batch), "sequence_length": (1, prompt // 2, prompt), "past_sequence_length": (0, 0, 0),
         "total_sequence_length": (1, prompt // 2, prompt)},
        {"batch": (1, 1, batch), "sequence_length": (1, 1, 1), "past_sequence_length": (0, seq // 2, seq - 1),
         "total_sequence_length": (1, seq // 2 + 1, seq)},
    ]  # fmt: skip
    out = []
    for sizes in axes:
        shapes = {}
        for name, dims in inputs.items():
            unknown = [d for d in dims if isinstance(d, str) and d not in sizes]
            if unknown:
                raise ValueError(f"input {name} has axis {unknown[0]!r}, which is not an axis of the standard export")
            corners: list[Shape] = [tuple(sizes[d][k] if isinstance(d, str) else d for d in dims) for k in range(3)]
            shapes[name] = (corners[0], corners[1], corners[2])
        out.append(shapes)
    return out


def build_engine(onnx_dir: Path, engine_dir: Path, options, environment: dict[str, Any]) -> dict[str, Any]:
    """Build `model.plan` from onnx_dir/model.onnx into engine_dir (staged, then renamed); return its facts."""
    import tensorrt as trt

    from pipeline.artifacts import list_files
    from pipeline.source import file_sha256

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_dir / "model.onnx")):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_dir.name}/model.onnx: {errors}")
    config = builder.create_builder_config()
    for shapes in profiles(graph_inputs(onnx_dir / "model.onnx"), options):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT's builder returned no engine (its log above says why)")
    with tempfile.TemporaryDirectory(dir=engine_dir.parent) as tmp:
        staged = Path(tmp, "engine")
        staged.mkdir()
        (staged / "model.plan").write_bytes(bytes(memoryview(plan)))
        info = {
            "route": "onnx",
            "environment": environment,
            "build_options": options.model_dump(),
            "dtype": "float16",
            "strongly_typed": True,
            "profiles": {"prefill": PREFILL, "decode": DECODE},
            "hardware_compatible": False,
            "version_compatible": False,
            "onnx_artifact": onnx_dir.name,
            "onnx_sha256": file_sha256(onnx_dir / "model.onnx.data"),
        }
        info["engine_files"] = [entry.model_dump() for entry in list_files(staged)]
        (staged / "engine.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        shutil.rmtree(engine_dir, ignore_errors=True)
        staged.rename(engine_dir)
    return info


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
    from pipeline.formats.onnx import OnnxRuntime
    from pipeline.formats.tensorrt_engine import refuse_foreign_engine

    refuse_foreign_engine(engine_dir, environment)
    description = {"runtime": f"tensorrt {environment['tensorrt']}", "device": environment["gpu"],
                   "route": "onnx", **environment}  # fmt: skip
    return OnnxRuntime(onnx_dir, session=TensorRTSession(engine_dir / "model.plan"), description=description)
