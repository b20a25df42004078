"""GPTQ INT4/INT8 checkpoints in the format transformers (via gptqmodel), vLLM, TGI and Xinference load.

Quantization runs layer by layer, streamed from the safetensors files: the calibration samples' hidden states are
pushed through one decoder layer at a time (built from the checkpoint's own transformers class, weights read for
that layer only), collecting each linear's input Hessian H = 2XXᵀ/n; the layer's linears are quantized with our
GPTQ solver (`pipeline.gptq`); the layer is run again on its quantized weights to produce the next layer's inputs,
so error does not compound unseen. Only one layer's weights, activations and Hessians are in memory at a time.
With `quantizer: gptqmodel` the reference implementation (GPTQModel) quantizes instead, into the same layout.

The artifact is the GPTQ v1 layout (`pipeline.gptq.to_checkpoint`): qweight, qzeros (zero - 1), fp16 scales and
g_idx per linear; everything else float16; config.json with `quantization_config` and a quantize_config.json; the
source's tokenizer and chat template; safetensors shards above `shard_size`.

The smoke test does not judge with our own unpacking code: it loads the artifact the way serving stacks do, with
transformers' `from_pretrained` and GPTQModel's kernels (`torch` on CPU, which computes with the exact weights;
GPTQModel's own `TORCH_INT8` CPU kernel is faster but re-quantizes the weights per channel, which costs INT8 GPTQ
most of its accuracy), and records that in `validated_by`. Where gptqmodel or optimum is not installed it falls back
to a dequantizing check in transformers and says so. The manifest also records round-to-nearest's perplexity ratio
on the same weights, grid and text: the floor GPTQ must beat.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from pipeline.formats import FormatError, check_group_size, parse_size

QUANTS = ("int4", "int8")
EXTRA = "gptq"
HARDWARE = {"build": ("cuda", "cpu"), "smoke": ("cpu", "cuda")}
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
log = logging.getLogger("weightsmith")


class Options(BaseModel):
    """Target options for GPTQ."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group_size: Literal[-1, 32, 64, 128, 256] = 128  # -1: one scale per output channel
    sym: bool = True
    desc_act: bool = False  # act-order: columns by decreasing Hessian diagonal
    static_groups: bool = False  # with act-order, group grids fixed beforehand (g_idx stays in input order)
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    quantizer: Literal["weightsmith", "gptqmodel"] = "weightsmith"
    threads: int | None = None  # torch threads for the solver (default: torch's, all cores; 1 on a loaded machine)
    shard_size: int = 2_000_000_000  # bytes per safetensors shard

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value)


def bits(quant: str) -> int:
    return {"int4": 4, "int8": 8}[quant]


def check_options(quant: str, options: Options) -> None:
    if options.static_groups and not options.desc_act:
        raise FormatError("static_groups only applies with desc_act: true")


def missing_dependency(step: str, target) -> str | None:
    options = Options.model_validate(target.options)
    if step == "build" and options.quantizer == "gptqmodel":
        try:
            import gptqmodel  # noqa: F401
        except ImportError:
            return f"quantizer gptqmodel needs GPTQModel: pip install 'weightsmith[{EXTRA}]'"
    return None  # smoke falls back to a dequantizing check, and says so


def is_quantized(name: str) -> bool:
    return bool(LINEAR.match(name))


def check(source, target) -> None:
    options = Options.model_validate(target.options)
    check_options(target.quant, options)
    if source.model_type not in SUPPORTED:
        raise FormatError(f"GPTQ is not set up for architecture {source.model_type!r} (supported: "
                          f"{', '.join(SUPPORTED)})")  # fmt: skip
    if options.group_size != -1:
        check_group_size(source, options.group_size, is_quantized)


def spec_for(target):
    from pipeline.gptq import QuantSpec

    o = Options.model_validate(target.options)
    return QuantSpec(bits=bits(target.quant), group_size=o.group_size, sym=o.sym, desc_act=o.desc_act,
                     static_groups=o.static_groups, damp=o.damp)  # fmt: skip


def quantization_config(spec) -> dict[str, Any]:
    from pipeline import __version__

    return {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": spec.desc_act,
        "sym": spec.sym,
        "static_groups": spec.static_groups,
        "damp_percent": spec.damp,
        "true_sequential": False,
        "lm_head": False,
        "checkpoint_format": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"weightsmith:{__version__}"]},
    }


def build(source, target, out_dir: Path, *, name: str, progress=None, calibration=None) -> dict[str, Any]:
    from pipeline.corpus import calibration_samples, load_text, samples_digest
    from pipeline.source import load_tokenizer

    options = Options.model_validate(target.options)
    spec = spec_for(target)
    tokenizer = load_tokenizer(source.path, source.trust_remote_code)
    text = load_text(calibration.text, "calibration")
    samples = calibration_samples(tokenizer, text, calibration.samples, calibration.seq_len, calibration.seed)
    facts = {"quantizer": options.quantizer, "calibration": {
        "text": calibration.text, "samples": len(samples), "seq_len": calibration.seq_len, "seed": calibration.seed,
        "sha256": samples_digest(samples)}}  # fmt: skip
    start = time.perf_counter()
    if options.quantizer == "gptqmodel":
        from pipeline.formats.gptq_reference import quantize_with_gptqmodel

        facts["layers"] = quantize_with_gptqmodel(source, spec, samples, out_dir)
    else:
        # bench/gptq.py: on an idle 2-core machine two solver threads are faster than one; on a loaded one a single
        # thread solved 3-8x faster, which is what `threads: 1` is for
        threads = options.threads or torch_threads()
        facts["layers"] = write_quantized(source, spec, samples, out_dir, options.shard_size, threads)
        facts["solver_threads"] = threads
    facts["quantize_s"] = round(time.perf_counter() - start, 2)
    if options.quantizer == "weightsmith":
        _write_configs(source, spec, out_dir)
    for name in [*source.tokenizer_files, "generation_config.json"]:
        if (source.path / name).is_file():
            shutil.copy(source.path / name, out_dir / name)
    return facts


def _write_configs(source, spec, out_dir: Path) -> None:
    from pipeline.source import portable_config

    qconfig = quantization_config(spec)
    config = portable_config(source.config())
    config.update({"quantization_config": qconfig, "torch_dtype": "float16", "dtype": "float16"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n", encoding="utf-8")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def write_quantized(source, spec, samples: list[list[int]], out_dir: Path, shard_size: int, threads: int) -> list:
    """Quantize layer by layer and write the checkpoint; return each layer's per-linear output errors (GPTQ's and
    round-to-nearest's on the same grid, relative to the layer's float outputs on the calibration inputs). Forward
    passes use all of torch's threads; the solver uses `threads`."""
    import torch

    from pipeline.formats.gptq_layers import LayerStream
    from pipeline.gptq import gptq, output_errors, rtn, split_rows, to_checkpoint

    stream = LayerStream(source, samples)
    writer = ShardWriter(out_dir, shard_size)
    for name, tensor in stream.other_tensors():
        writer.add(name, tensor.to(torch.float16))
    report, started, forward_threads = [], time.perf_counter(), torch.get_num_threads()
    for index in range(stream.n_layers):
        layer_start = time.perf_counter()
        layer, originals, groups = stream.collect(index)
        errors = {}
        torch.set_num_threads(threads)
        for members, hessian in groups:  # linears reading one input share its Hessian: one solve for all their rows
            weights = [originals[f"{name}.weight"] for name, _ in members]
            solved = gptq(torch.cat(weights), hessian, spec)
            for (name, module), part in zip(members, split_rows(solved, [w.shape[0] for w in weights])):
                weight = originals[f"{name}.weight"]
                found = output_errors(weight, {"gptq": part.dequantized, "rtn": rtn(weight, spec).dequantized},
                                      hessian, stream.dtype)  # fmt: skip
                errors[name] = {k: round(v, 6) for k, v in found.items()}
                module.weight.data = part.dequantized.to(stream.dtype)
                prefix = f"model.layers.{index}.{name}"
                for key, value in to_checkpoint(part, spec.bits).items():
                    writer.add(f"{prefix}.{key}", value)
                if module.bias is not None:
                    writer.add(f"{prefix}.bias", originals[f"{name}.bias"].to(torch.float16))
        torch.set_num_threads(forward_threads)
        for name, tensor in originals.items():
            if name.rsplit(".", 1)[0] not in errors:  # norms and other parameters that stay in float
                writer.add(f"model.layers.{index}.{name}", tensor.to(torch.float16))
        stream.advance(layer)
        seconds = time.perf_counter() - layer_start
        report.append({"layer": index, "seconds": round(seconds, 2), "errors": errors})
        eta = (time.perf_counter() - started) / (index + 1) * (stream.n_layers - index - 1)
        mean = np.mean([e["gptq"] for e in errors.values()])
        log.info("gptq: layer %d/%d in %.1f s (mean output error %.4f), about %.0f s left", index + 1, stream.n_layers,
                 seconds, mean, eta)  # fmt: skip
    writer.close()
    return report


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` (a tensor larger than that gets its own), and
    the index transformers reads when there is more than one."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map, total = {}, 0
        for i, (path, names) in enumerate(self.shards):
            final = self.folder / f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(final)
            total += final.stat().st_size
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def smoke(artifact_dir: Path, reference, validation) -> dict[str, Any]:
    from pipeline.formats.gptq_runtime import open_runtime, rtn_quality
    from pipeline.validate import smoke_test

    runtime = open_runtime(artifact_dir)
    result = smoke_test(runtime, reference, validation)
    config = json.loads((artifact_dir / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    quality = result["quality"]
    quality["rtn_ppl_ratio"] = rtn_quality(reference, config)["ppl_ratio"]
    result["smoke"]["validated_by"] = runtime.description["validated_by"]
    result["failures"] += beats_rtn(quality["ppl_ratio"], quality["rtn_ppl_ratio"])
    return result


RTN_SIGNAL = 1.01  # below this round-to-nearest loses too little for the comparison to say anything (INT8)


def beats_rtn(ppl_ratio: float, rtn_ppl_ratio: float) -> list[str]:
    """GPTQ that is no better than round-to-nearest on the same grid is broken, whatever the budget says."""
    if rtn_ppl_ratio > RTN_SIGNAL and ppl_ratio >= rtn_ppl_ratio:
        return [f"perplexity ratio {ppl_ratio:.4f} is not below round-to-nearest's {rtn_ppl_ratio:.4f} on the same "
                f"grid: the GPTQ solve did not help (check the calibration data and damp)"]  # fmt: skip
    return []


def cpu_workers() -> None:
    """GPTQModel refuses to start on 2 cores unless told how many CPU workers it may use."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
