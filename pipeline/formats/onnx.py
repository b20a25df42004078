"""ONNX, run by onnxruntime (Windows and CPU-only serving, Olive and onnxruntime-genai users, plain TensorRT builds).

Two flavours, chosen by the `flavour` option:

- `standard` (fp32, fp16): a standard-opset graph with the KV cache as explicit inputs and outputs, exported with
  torch's exporter (`onnx_export`) in the model's own mixed precision (norms and softmax upcast as transformers
  computes them). This is the graph a plain TensorRT builder takes; TensorRT builds strongly typed networks (10.12
  deprecated, 11 removed the FP16 builder flag), so an fp16 engine needs the fp16 graph.
- `genai` (fp32, fp16, int4): onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder`), run
  as a subprocess; its graphs use ORT contrib ops (GroupQueryAttention, MatMulNBits) and the folder carries
  `genai_config.json` and the tokenizer, so `onnxruntime_genai.Model` runs it as it is.

Which architectures: the rows of `pipeline.archs` with `onnx_export` (standard) or `onnx_genai` (genai). The artifact
is validated in onnxruntime (`pipeline.runtimes.onnxruntime`). Hand-off file: an onnxruntime example.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from pipeline.archs import arch
from pipeline.checkpoint import portable_view
from pipeline.formats import onnx_export
from pipeline.formats.base import BuildContext, Format, missing_modules, refuse_unless
from pipeline.formats.base import Options as BaseOptions
from pipeline.resources import ModelSize, Needs
from pipeline.runtimes.onnxruntime import OnnxRuntime
from pipeline.types import Calibration, FormatError, Manifest, SourceInfo, Step, Validation

STANDARD_QUANTS = ("fp32", "fp16")


class Options(BaseOptions):
    """Target options for ONNX."""

    flavour: Literal["auto", "standard", "genai"] = "auto"  # auto: standard for fp32, genai otherwise
    execution_provider: Literal["cpu", "cuda"] = "cpu"  # what the genai builder optimises the graph for
    block_size: Literal[16, 32, 64, 128, 256] = 32  # int4: weights sharing one scale (MatMulNBits block)


def flavour(quant: str, options: Options) -> str:
    return ("standard" if quant == "fp32" else "genai") if options.flavour == "auto" else options.flavour


class ONNX(Format):
    name = "onnx"
    quants = ("fp32", "fp16", "int4")
    extra = "onnx"
    library = "onnx"
    options_model = Options
    hardware = {Step.BUILD: ("cpu", "cuda"), Step.VALIDATE: ("cuda", "cpu")}
    options: Options

    @classmethod
    def check_options(cls, quant: str, options: Options) -> None:
        if flavour(quant, options) == "standard" and quant not in STANDARD_QUANTS:
            raise FormatError(f"the standard ONNX export is fp32 or fp16; use flavour genai for {quant}")

    @property
    def flavour(self) -> str:
        return flavour(self.quant, self.options)

    def missing_dependency(self, step: Step) -> str | None:
        needed = ["onnx", "onnxruntime"]
        if self.flavour == "genai":
            needed += ["onnxruntime_genai", "onnx_ir"]
        elif step == Step.BUILD:
            needed += ["onnxscript"]  # torch's exporter
        return missing_modules({m: m for m in needed}, self.extra)

    def check(self, source: SourceInfo) -> None:
        row = arch(source.model_type)
        if self.flavour == "genai":
            refuse_unless(row.onnx_genai, "ONNX (genai)", source.model_type, "onnx_genai",
                          "onnxruntime-genai's model builder is not set up for it")  # fmt: skip
        else:
            refuse_unless(row.onnx_export, "ONNX (standard)", source.model_type, "onnx_export",
                          "torch's exporter with our KV-cache wrapper is not shown to handle it")  # fmt: skip

    def build(self, source: SourceInfo, out_dir: Path, ctx: BuildContext) -> dict[str, Any]:
        if self.flavour == "standard":
            facts = onnx_export.export(source.path, out_dir, source.trust_remote_code, self.quant)
            copy_tokenizer(source, out_dir)
            return {"flavour": self.flavour, "precision": self.quant, **facts}
        log = run_genai_builder(source, self.quant, self.options, out_dir)
        copy_tokenizer(source, out_dir)
        config = json.loads((out_dir / "genai_config.json").read_text(encoding="utf-8"))
        decoder = config["model"]["decoder"]
        return {
            "flavour": self.flavour,
            "precision": self.quant,
            "execution_provider": self.options.execution_provider,
            "block_size": self.options.block_size if self.quant == "int4" else None,
            "n_layers": decoder["num_hidden_layers"],
            "inputs": decoder["inputs"],
            "builder_log_tail": log[-600:],
        }

    def needs(self, size: ModelSize, validation: Validation, calibration: Calibration) -> Needs:
        """torch.onnx holds the float32 model and its traced copy (2.7x float32 measured, issue 18); onnxruntime-genai's
        builder the float32 model and its output; onnxruntime the graph's weights."""
        bits = {"fp32": 32, "fp16": 16, "int4": 5}[self.quant]
        build = int(2.7 * size.float32) if self.options.flavour == "standard" or self.quant != "int4" else \
            int(1.5 * size.float32)  # fmt: skip
        return Needs({Step.BUILD: build, Step.VALIDATE: size.at_bits(bits) + size.float32 // 4},
                     disk=size.at_bits(bits))  # fmt: skip

    def open_runtime(self, artifact: Path, reference, validation: Validation) -> OnnxRuntime:
        return OnnxRuntime(artifact)

    def handoff_files(self, artifact: Path, manifest: Manifest, chat: dict[str, Any]) -> dict[str, str]:
        """An example that runs the graph with onnxruntime (or onnxruntime-genai), relative to its folder."""
        return onnx_example(artifact, manifest)


def copy_tokenizer(source: SourceInfo, out_dir: Path) -> None:
    """The source's own tokenizer files travel with the graph. (The genai builder re-saves the tokenizer
    AutoTokenizer gave it, which for some configs is a model-specific class with another pre-tokenizer.)"""
    for name in source.tokenizer_files:
        shutil.copy(source.path / name, out_dir / name)


def run_genai_builder(source: SourceInfo, quant: str, options: Options, out_dir: Path) -> str:
    cache = out_dir.parent / f".{out_dir.name}.genai-cache"
    shadow = out_dir.parent / f".{out_dir.name}.genai-source"
    try:
        portable_view(source.path, shadow)  # the builder reads config.json through transformers 4-style keys
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


def onnx_example(folder: Path, manifest: Manifest) -> dict[str, str]:
    here = "from pathlib import Path\n\nhere = Path(__file__).resolve().parent  # this artifact's folder\n"
    if (folder / "genai_config.json").is_file():
        body = f"""import onnxruntime_genai as og
{here}
model = og.Model(str(here))
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=256)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("What is the capital of France?"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
"""
    else:
        body = f"""import onnxruntime as ort
{here}
session = ort.InferenceSession(str(here / "model.onnx"), providers=["CPUExecutionProvider"])
print([i.name for i in session.get_inputs()])  # input_ids, attention_mask, position_ids, past_key_values.*
"""
    title = f"Run {manifest.model} {manifest.quant} (ONNX) with onnxruntime."
    return {"onnxruntime_example.py": f'"""{title}"""\n' + body}
