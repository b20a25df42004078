"""Plain TensorRT: an engine built from the recipe's standard ONNX export, for CUDA workers that have TensorRT but
not TensorRT-LLM (or a model TensorRT-LLM's checkpoint route does not cover).

The build parses the fp16 standard export (`pipeline.formats.onnx`, option `onnx_target` of the tensorrt target)
with TensorRT's ONNX parser into a strongly typed network: TensorRT 10.12 deprecated and 11 removed the precision
builder flags, so the engine computes in the graph's own precision. Two optimization profiles, one per phase of
our decode loop, each consistent at its corners (total = past + sequence, which the attention's broadcasts need):

    prefill  sequence_length 1..max_input_len, past_sequence_length 0, total_sequence_length 1..max_input_len
    decode   sequence_length 1, past_sequence_length 0..max_seq_len-1, total_sequence_length 1..max_seq_len

with batch 1..max_batch_size in both. The engine runs in `pipeline.runtimes.tensorrt` (the ONNX decode loop over a
TensorRT session).

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
from typing import Any

from pipeline.runtimes.tensorrt import DECODE, PREFILL

INSTALL = "pip install 'tensorrt-cu12==10.*' --extra-index-url https://pypi.nvidia.com (on a CUDA machine)"
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
    from pipeline.files import file_sha256

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
