"""GPTQ INT4/INT8 checkpoints in the format transformers (via gptqmodel), vLLM, TGI and Xinference load.

Quantization runs layer by layer, streamed from the safetensors files: the calibration samples' hidden states are
pushed through one decoder layer at a time (built from the checkpoint's own transformers class, weights read for
that layer only), collecting each linear's input Hessian H = 2XXᵀ/n; the layer's linears are quantized with our
GPTQ solver (`pipeline.quantizers.gptq`); the layer is run again on its quantized weights to produce the next
layer's inputs, so error does not compound unseen. Only one layer's weights, activations and Hessians are in memory
at a time. With `quantizer: gptqmodel` the reference implementation (GPTQModel) quantizes instead, into the same
layout.

The artifact is the GPTQ v1 layout (`pipeline.quantizers.gptq.to_checkpoint`): qweight, qzeros (zero - 1), fp16
scales and g_idx per linear; everything else float16; config.json with `quantization_config` and a
quantize_config.json; the source's tokenizer and chat template; safetensors shards above `shard_size`.

Which architectures: the rows of `pipeline.archs` that list the decoder layer's linears (`gptq_linears`), and for
a mixture of experts where its experts are (`gptq_experts`): every expert is calibrated on the tokens the router
sends it (all the layer's tokens where that is fewer than `expert_floor`; the build facts' `expert_coverage` says
per layer), solved on its own and written per expert under the checkpoint's own names (`mlp.experts.3.gate_proj`,
Mixtral's `block_sparse_moe.experts.3.w1`), as vLLM's and GPTQModel's MoE loaders read them; routers stay float16.
Checkpoints that keep their experts fused (gpt-oss, Llama 4: `Experts.fused`) are written per expert as GPTQModel
writes them after defuser's split (`Experts.unfused`), with the experts' biases in float16.
The quantizer itself lives in `pipeline.quantizers` (`gptq` the solver, `layers` the calibration stream).

Validation does not judge with our own unpacking code: it loads the artifact the way serving stacks do, with
transformers' `from_pretrained` and GPTQModel's kernels (`torch` on CPU, which computes with the exact weights;
GPTQModel's own `TORCH_INT8` CPU kernel is faster but re-quantizes the weights per channel, which costs INT8 GPTQ
most of its accuracy), and records that in `validated_by`. Where gptqmodel or optimum is not installed it falls back
to a dequantizing check in transformers and says so. The manifest also records round-to-nearest's perplexity ratio
on the same weights, grid and text: the floor GPTQ must beat. Hand-off files: a vLLM serve script, an Xinference
registration and a transformers example.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from pipeline import handoff
from pipeline.archs import SWIGLU, arch
from pipeline.checkpoint import LAYER, MXFP4_PARTS, ShardWriter, mxfp4_packed
from pipeline.corpus import calibration_samples, load_text, samples_digest
from pipeline.formats.base import BuildContext, Format, ServedByVllm, check_group_size, parse_size, refuse_unless
from pipeline.formats.base import Options as BaseOptions
from pipeline.resources import ModelSize, Needs
from pipeline.source import load_tokenizer
from pipeline.types import Calibration, FormatError, Manifest, Serving, SourceInfo, Step, Validation

# vLLM 0.32's GPTQ loader (`--quantization gptq`, measured: ../shared/FINDINGS.md): what it takes of each config key
VLLM_GPTQ = {"bits": (4,), "sym": (True,), "group_size": (-1, 32, 64, 128), "desc_act": (False,)}
VLLM = "vLLM 0.32's GPTQ loader rules"
LAYER_WEIGHT = re.compile(LAYER.pattern + r"(.+)\.weight$")  # a decoder layer's weight: its index, its module's name
SHARED_EXPERT = re.compile(r"(^|\.)shared_experts?\.")  # Qwen's `mlp.shared_expert.`, DeepSeek's `mlp.shared_experts.`
RTN_SIGNAL = 1.01  # below this round-to-nearest loses too little for the comparison to say anything (INT8)
log = logging.getLogger("weightsmith")


class Options(BaseOptions):
    """Target options for GPTQ."""

    group_size: Literal[-1, 32, 64, 128, 256] = 128  # -1: one scale per output channel
    sym: bool = True
    desc_act: bool = False  # act-order: columns by decreasing Hessian diagonal
    static_groups: bool = False  # with act-order, group grids fixed beforehand (g_idx stays in input order)
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    quantizer: Literal["weightsmith", "gptqmodel"] = "weightsmith"
    threads: int | None = None  # torch threads for the solver (default: torch's, all cores; 1 on a loaded machine)
    shard_size: int = 2_000_000_000  # bytes per safetensors shard
    # mixtures of experts: an expert the router sent fewer calibration tokens than this is calibrated on all of the
    # layer's tokens instead (0: only those that saw none; see pipeline.quantizers.layers)
    expert_floor: int = Field(64, ge=0)
    # mixtures of experts: quantize the shared experts too (Qwen 3.5 MoE, Qwen3-Next, DeepSeek-V3); by default they
    # stay in float16 like the routers: every token goes through them
    shared_experts: bool = False

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value)


def bits(quant: str) -> int:
    return {"int4": 4, "int8": 8}[quant]


class GPTQ(ServedByVllm, Format):
    name = "gptq"
    shares_process = True  # torch, layer by layer: safe beside other targets (pipeline.lanes)
    quants = ("int4", "int8")
    extra = "gptq"
    library = "transformers"
    options_model = Options
    hardware = {Step.BUILD: ("cuda", "cpu"), Step.VALIDATE: ("cpu", "cuda")}
    options: Options

    @classmethod
    def check_options(cls, quant: str, options: Options) -> None:
        if options.static_groups and not options.desc_act:
            raise FormatError("static_groups only applies with desc_act: true")

    @property
    def spec(self):
        from pipeline.quantizers.gptq import QuantSpec

        o = self.options
        return QuantSpec(bits=bits(self.quant), group_size=o.group_size, sym=o.sym, desc_act=o.desc_act,
                         static_groups=o.static_groups, damp=o.damp)  # fmt: skip

    @property
    def calibrates(self) -> bool:
        return True

    def missing_dependency(self, step: Step) -> str | None:
        if step == Step.SERVE:
            return self.missing_vllm()
        if step == Step.BUILD and self.options.quantizer == "gptqmodel":
            try:
                import gptqmodel  # noqa: F401
            except ImportError:
                return f"quantizer gptqmodel needs GPTQModel: pip install 'weightsmith[{self.extra}]'"
        return None  # validation falls back to a dequantizing check, and says so

    def check(self, source: SourceInfo) -> None:
        row = arch(source.model_type)
        refuse_unless(
            row.gptq,
            "GPTQ",
            source.model_type,
            "gptq",
            row.gptq_refused or "the layer-wise quantizer does not know its decoder layer's linears",
        )
        check_experts(source, row.gptq_experts, self.options.quantizer)
        if self.options.group_size != -1:
            linears = gptq_linears(row, self.options.shared_experts)
            check_group_size(source, self.options.group_size, gptq_input(row, linears))

    def build(self, source: SourceInfo, out_dir: Path, ctx: BuildContext) -> dict[str, Any]:
        calibration, spec = ctx.calibration, self.spec
        tokenizer = load_tokenizer(source.path, source.trust_remote_code)
        text = load_text(calibration.text, "calibration")
        samples = calibration_samples(tokenizer, text, calibration.samples, calibration.seq_len, calibration.seed)
        facts: dict[str, Any] = {"quantizer": self.options.quantizer, "calibration": {
            "text": calibration.text, "samples": len(samples), "seq_len": calibration.seq_len,
            "seed": calibration.seed, "sha256": samples_digest(samples)}}  # fmt: skip
        start = time.perf_counter()
        if self.options.quantizer == "gptqmodel":
            from pipeline.quantizers.gptqmodel import quantize_with_gptqmodel

            facts["layers"] = quantize_with_gptqmodel(source, spec, samples, out_dir)
        else:
            # bench/gptq.py: on an idle 2-core machine two solver threads are faster than one; on a loaded one a
            # single thread solved 3-8x faster, which is what `threads: 1` is for
            threads, row = self.options.threads or torch_threads(), arch(source.model_type)
            linears = gptq_linears(row, self.options.shared_experts)
            facts["layers"] = write_quantized(source, spec, samples, out_dir, self.options.shard_size, threads,
                                              self.options.expert_floor, ctx.work, linears)  # fmt: skip
            facts["solver_threads"] = threads
            if any(SHARED_EXPERT.search(name) for name in row.gptq_linears):
                facts["shared_experts"] = "quantized" if self.options.shared_experts else "float16"
            if row.gptq_experts:
                facts["expert_floor"] = self.options.expert_floor
                facts["expert_coverage"] = [layer.pop("coverage") for layer in facts["layers"] if "coverage" in layer]
            write_configs(source, spec, out_dir, modules_in_block(facts["layers"], row))
        facts["quantize_s"] = round(time.perf_counter() - start, 2)
        for name in [*source.tokenizer_files, "generation_config.json"]:
            if (source.path / name).is_file():
                shutil.copy(source.path / name, out_dir / name)
        return facts

    def needs(self, size: ModelSize, validation: Validation, calibration: Calibration) -> Needs:
        """A layer at a time in float32 with the calibration activations (a second copy for experts' top-ups) and, for
        a mixture of experts, every expert's Hessians; validation holds the quantized model and, for
        round-to-nearest's floor, the source in float32."""
        weight_bits = bits(self.quant) + 0.5
        activations = 4 * calibration.samples * calibration.seq_len * size.hidden * 4
        experts = size.experts * (size.hidden**2 + size.expert_inter**2) * 4 + activations if size.experts else 0
        build = 3 * size.largest_layer * 2 + activations + experts + size.vocab * size.hidden * 4
        return Needs({Step.BUILD: build, Step.VALIDATE: size.float32 + size.at_bits(weight_bits)},
                     disk=size.at_bits(weight_bits))  # fmt: skip

    def open_runtime(self, artifact: Path, reference, validation: Validation):
        from pipeline.runtimes.transformers import open_gptq

        return open_gptq(artifact)

    def validate(self, artifact: Path, reference, validation: Validation) -> dict[str, Any]:
        """The common checks, plus round-to-nearest's figures on the same grid: GPTQ must beat them."""
        result = super().validate(artifact, reference, validation)
        config = json.loads((artifact / "config.json").read_text(encoding="utf-8"))["quantization_config"]
        quality = result["quality"]
        quality["rtn_ppl_ratio"] = rtn_quality(reference, config)["ppl_ratio"]
        result["smoke"]["validated_by"] = result["smoke"]["runtime"]["validated_by"]
        result["failures"] += beats_rtn(quality["ppl_ratio"], quality["rtn_ppl_ratio"])
        return result

    def serving(self, artifact: Path) -> dict[str, Serving]:
        config = json.loads((artifact / "config.json").read_text(encoding="utf-8"))["quantization_config"]
        why = vllm_refusal(config)
        return {"vllm": Serving(accepts=why is None, why=why, by=VLLM)}

    def handoff_files(self, artifact: Path, manifest: Manifest, chat: dict[str, Any]) -> dict[str, str]:
        """A vLLM serve script (where vLLM takes the checkpoint), an Xinference registration and a transformers
        example."""
        return gptq_files(artifact, manifest, chat)


def vllm_refusal(config: dict[str, Any]) -> str | None:
    """What vLLM's GPTQ loader refuses in a checkpoint's quantization config, or None."""
    refused = [f"{key} {json.dumps(config[key])}" for key, takes in VLLM_GPTQ.items() if config[key] not in takes]
    if not refused:
        return None
    return (f"vLLM's GPTQ loader takes 4-bit symmetric checkpoints with group -1/32/64/128 and no act-order scattering "
            f"(desc_act false); this one has {', '.join(refused)}")  # fmt: skip


def quantization_config(spec) -> dict[str, Any]:
    """The checkpoint's `quantization_config`. `desc_act` tells a loader that `g_idx` is not trivial (columns of a group
    are scattered); act-order with static groups, or with one group per row, leaves it trivial, so such a checkpoint
    is written as what it is, `desc_act: false` (vLLM refuses `desc_act: true` with groups), and `meta` records that
    act-order was used to solve it."""
    from pipeline import __version__

    return {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": scattered_groups(spec),
        "sym": spec.sym,
        "static_groups": spec.static_groups,
        "damp_percent": spec.damp,
        "true_sequential": False,
        "lm_head": False,
        "checkpoint_format": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"weightsmith:{__version__}"], "act_order": spec.desc_act},
    }


def scattered_groups(spec) -> bool:
    """Whether act-order left each group's columns scattered over the row (a `g_idx` that is not i // group_size)."""
    return spec.desc_act and not spec.static_groups and spec.group_size != -1


def modules_in_block(layers: list[dict], row) -> list[list[str]] | None:
    """Where GPTQ left some of a layer's linears in float: the names of those it quantized, as the config's
    `modules_in_block_to_quantize` (transformers' GPTQ loading otherwise expects every linear of a layer packed);
    experts under the per-expert modules' names that the loaders build. None where every linear is quantized."""
    if not any("float_linears" in layer for layer in layers):
        return None
    names = {name for layer in layers for name in layer["errors"]}
    experts = max((len(layer.get("expert_errors", {}).get("gptq", [])) for layer in layers), default=0)
    for expert in range(experts):
        names |= {f"{row.gptq_experts.module}.experts.{expert}.{part}" for part in row.gptq_experts.parts}
    return [sorted(names)]


def write_configs(source: SourceInfo, spec, out_dir: Path, in_block: list[list[str]] | None = None) -> None:
    from pipeline.checkpoint import portable_config

    qconfig = quantization_config(spec)
    if in_block:
        qconfig["modules_in_block_to_quantize"] = in_block
    config = portable_config(source.config())
    config.update({"quantization_config": qconfig, "torch_dtype": "float16", "dtype": "float16"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n", encoding="utf-8")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def write_quantized(source: SourceInfo, spec, samples: list[list[int]], out_dir: Path, shard_size: int,
                    threads: int, expert_floor: int = 64, store_dir: Path | None = None,
                    linears: tuple[str, ...] | None = None) -> list:  # fmt: skip
    """Quantize layer by layer and write the checkpoint; return each layer's per-linear output errors (GPTQ's and
    round-to-nearest's on the same grid, relative to the layer's float outputs on the calibration inputs; experts'
    as one mean per expert) and, for a mixture of experts, its coverage record. Forward passes use all of torch's
    threads; the solver uses `threads`. With `store_dir`, each finished layer is kept there and a rerun with the same
    inputs resumes after the last one (pipeline.quantizers.resume); the folder is removed once the checkpoint is
    complete. `linears`: those GPTQ quantizes (default: all the row lists)."""
    import torch

    from pipeline.quantizers.layers import LayerStream

    row = arch(source.model_type)
    linears = linears or row.gptq_linears
    stream = LayerStream(source, samples, linears, experts=row.gptq_experts, expert_floor=expert_floor, capture=True)
    store = layer_store(store_dir, source, spec, samples, expert_floor, stream.dtype, threads, linears)
    writer = ShardWriter(out_dir, shard_size)
    for name, tensor in stream.other_tensors():
        writer.add(name, tensor.to(torch.float16))
    report, started, forward_threads = [], time.perf_counter(), torch.get_num_threads()
    first = store.finished() if store else 0
    if first:
        log.info("gptq: resuming after layer %d/%d, finished by an earlier run", first, stream.n_layers)
        for index in range(first):
            written, entry = store.load(index)
            for name, tensor in written:
                writer.add(name, tensor)
            report.append(entry)
        stream.resume(first, store.hidden(first - 1))
    for index in range(first, stream.n_layers):
        layer_start = time.perf_counter()
        layer, originals, groups, experts = stream.collect(index)
        prefix, written = f"{stream.decoder}layers.{index}.", Written()
        torch.set_num_threads(threads)
        errors = quantize_linears(groups, originals, spec, stream.dtype, written, prefix)
        entry = {"layer": index, "errors": errors}
        if experts is not None:
            entry["expert_errors"] = quantize_experts(experts, row.gptq_experts, originals, spec, stream.dtype,
                                                      written, prefix)  # fmt: skip
            entry["coverage"] = experts.coverage(index)
            log_coverage(entry["coverage"], stream.n_layers)
        torch.set_num_threads(forward_threads)
        for name, tensor in originals.items():
            if name.rsplit(".", 1)[0] not in errors and not (row.gptq_experts and row.gptq_experts.owns(f".{name}")):
                written.add(f"{prefix}{name}", tensor.to(torch.float16))  # norms, routers: what stays in float
        floats = sorted(n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and n not in errors)
        if floats:  # linears GPTQ leaves in float (a DeltaNet's decay and beta projections, a shared expert's gate)
            entry["float_linears"] = floats
        stream.advance(layer, index)
        seconds = time.perf_counter() - layer_start
        report.append({"layer": index, "seconds": round(seconds, 2), **entry})
        if store:
            store.save(index, written.tensors, report[-1], stream.hidden)
        for name, tensor in written.tensors:
            writer.add(name, tensor)
        eta = (time.perf_counter() - started) / (index - first + 1) * (stream.n_layers - index - 1)
        mean = np.mean([e["gptq"] for e in errors.values()] + entry.get("expert_errors", {}).get("gptq", []))
        log.info("gptq: layer %d/%d in %.1f s (mean output error %.4f), about %.0f s left", index + 1, stream.n_layers,
                 seconds, mean, eta)  # fmt: skip
    writer.close()
    if store:
        store.remove()
    return report


class Written:
    """One layer's output tensors in writing order, held until the layer is finished (then stored and written)."""

    def __init__(self):
        self.tensors: list[tuple[str, Any]] = []

    def add(self, name: str, tensor) -> None:
        self.tensors.append((name, tensor.contiguous()))


def layer_store(folder: Path | None, source: SourceInfo, spec, samples, expert_floor: int, dtype, threads: int,
                linears: tuple[str, ...]):  # fmt: skip
    """The store of finished layers for these inputs (None without a folder): everything that decides the bytes."""
    if folder is None:
        return None
    import torch

    from pipeline.quantizers.resume import LayerStore

    return LayerStore(folder, {"source": source.fingerprint, "spec": dataclasses.asdict(spec),
                               "samples": samples_digest(samples), "expert_floor": expert_floor, "dtype": str(dtype),
                               "linears": list(linears),
                               "threads": threads, "forward_threads": torch.get_num_threads(),
                               "torch": torch.__version__})  # fmt: skip


def quantize_linears(groups, originals: dict, spec, dtype, writer, prefix: str) -> dict[str, dict]:
    """The dense linears: one solve per group of linears reading one input (their rows stacked, one Hessian); each
    module's weight becomes its dequantized self, so the next layer's inputs come from the quantized layer."""
    import torch

    from pipeline.quantizers.gptq import gptq, split_rows

    errors = {}
    for members, hessian in groups:
        weights = [originals[f"{name}.weight"] for name, _ in members]
        solved = gptq(torch.cat(weights), hessian, spec)
        for (name, module), part in zip(members, split_rows(solved, [w.shape[0] for w in weights])):
            errors[name] = write_linear(writer, f"{prefix}{name}", originals[f"{name}.weight"], part, hessian, spec,
                                        dtype)  # fmt: skip
            module.weight.data = part.dequantized.to(dtype)
            if module.bias is not None:
                writer.add(f"{prefix}{name}.bias", originals[f"{name}.bias"].to(torch.float16))
    return errors


def quantize_experts(hessians, experts, originals: dict, spec, dtype, writer, prefix: str) -> dict:
    """Every expert its own solves: gate and up on their shared Hessian (rows stacked), down on its own; written
    per expert under the checkpoint's names (`experts.{e}.gate_proj`, Mixtral's `experts.{e}.w1`), which vLLM's and
    GPTQModel's MoE loaders read. The dequantized weights go back into transformers' fused tensors for the next
    layer's inputs. Returns each expert's mean output error over its three linears, GPTQ's and round-to-nearest's."""
    import torch

    from pipeline.quantizers.gptq import gptq, split_rows

    means = {"gptq": [], "rtn": []}
    for expert in range(len(hessians.tokens)):
        linears = experts.unfused(originals, expert)
        (gate, gate_bias), (up, up_bias), (down, down_bias) = (linears[p] for p in SWIGLU)
        gate_q, up_q = split_rows(gptq(torch.cat([gate, up]), hessians.gate_up[expert], spec), [len(gate), len(up)])
        down_q = gptq(down, hessians.down[expert], spec)
        found, gate_up_h, down_h = [], hessians.gate_up[expert], hessians.down[expert]
        for part, weight, bias, q, hessian in (("gate_proj", gate, gate_bias, gate_q, gate_up_h),
                                               ("up_proj", up, up_bias, up_q, gate_up_h),
                                               ("down_proj", down, down_bias, down_q, down_h)):  # fmt: skip
            name = f"{prefix}{experts.name(expert, part)}"
            found.append(write_linear(writer, name, weight, q, hessian, spec, dtype))
            if bias is not None:
                writer.add(f"{name}.bias", bias.to(torch.float16))
        for kind in means:
            means[kind].append(round(float(np.mean([f[kind] for f in found])), 6))
        put_back(hessians, expert, torch.cat([gate_q.dequantized, up_q.dequantized]), down_q.dequantized, dtype)
    return means


def put_back(hessians, expert: int, gate_up, down, dtype) -> None:
    """One expert's dequantized weights ([out, in], gate_proj's rows then up_proj's) back into transformers' fused
    experts module, in its layout ([experts, in, out] where it is transposed), for the next layer's inputs."""
    module, flip = hessians.module, hessians.transposed
    module.gate_up_proj.data[expert] = (gate_up.T if flip else gate_up).to(dtype)
    module.down_proj.data[expert] = (down.T if flip else down).to(dtype)


def write_linear(writer, name: str, weight, quantized, hessian, spec, dtype) -> dict[str, float]:
    """Write one quantized linear (GPTQ v1 tensors under `name`); return its output errors, GPTQ's and RTN's."""
    from pipeline.quantizers.gptq import output_errors, rtn, to_checkpoint

    for key, value in to_checkpoint(quantized, spec.bits).items():
        writer.add(f"{name}.{key}", value)
    found = output_errors(weight, {"gptq": quantized.dequantized, "rtn": rtn(weight, spec).dequantized}, hessian, dtype)
    return {k: round(v, 6) for k, v in found.items()}


def log_coverage(coverage: dict, layers: int) -> None:
    log.info("gptq: layer %d/%d experts saw %d-%d calibration tokens (median %g)%s", coverage["layer"] + 1, layers,
             coverage["min_tokens"], coverage["max_tokens"], coverage["median_tokens"],
             f", topped up to all tokens: {coverage['topped_up']}" if coverage["topped_up"] else "")  # fmt: skip


def gptq_linears(row, shared_experts: bool = False) -> tuple[str, ...]:
    """The row's linears that GPTQ quantizes: a mixture of experts' shared experts only with `shared_experts`."""
    return tuple(name for name in row.gptq_linears if shared_experts or not SHARED_EXPERT.search(name))


def quantized_weight(row, name: str, linears: tuple[str, ...] | None = None) -> bool:
    """Whether checkpoint tensor `name` is the weight of a decoder layer linear (or expert) that GPTQ quantizes
    (`linears`, default all the row lists)."""
    match = LAYER_WEIGHT.match(name)
    if not match:
        return False
    return match[2] in (linears or row.gptq_linears) or bool(row.gptq_experts and row.gptq_experts.matches(name))


def check_experts(source: SourceInfo, experts, quantizer: str) -> None:
    """The quantizer reads experts as the original checkpoints store them, one tensor per expert and part; a
    checkpoint with experts the row does not place (a MoE variant of a dense row, fused storage) is refused."""
    from pipeline.checkpoint import Checkpoint

    names = Checkpoint(source.path).names()
    stray = next((n for n in names if LAYER.match(n) and ".experts." in n
                  and not (experts and experts.owns(n))), None)  # fmt: skip
    if stray and stray.endswith(MXFP4_PARTS):
        raise mxfp4_packed("GPTQ", stray, "which the quantizer does not unpack")
    if stray:
        raise FormatError(f"GPTQ: the checkpoint holds experts ({stray}) where the {source.model_type} row of the "
                          f"architecture table does not place them (a mixture-of-experts variant, or experts stored "
                          f"fused); the quantizer writes one linear per expert and part")  # fmt: skip
    if experts is None:
        return
    if quantizer == "gptqmodel":
        raise FormatError("GPTQ: quantizer gptqmodel is not set up for mixture-of-experts models here; the default "
                          "quantizer (weightsmith) quantizes every expert")  # fmt: skip
    if not any(experts.matches(name) for name in names):
        raise FormatError(f"GPTQ: no per-expert tensors ({experts.name(0, 'gate_proj')}.weight ...) in the checkpoint "
                          f"(experts stored fused?); the quantizer reads experts one tensor per expert and part, as "
                          f"the original checkpoints and transformers' save_pretrained store them")  # fmt: skip


def gptq_input(row, linears: tuple[str, ...]):
    """check_group_size's `input_size` for GPTQ: a quantized linear's input size, its last axis; experts stored fused
    ([experts, in, out], gpt-oss, Llama 4) by their middle axis (gpt-oss-20b's 2880 takes groups of 32 or 64)."""

    def input_size(name: str, shape: tuple[int, ...]) -> int | None:
        if len(shape) == 2 and quantized_weight(row, name, linears):
            return shape[-1]
        experts = row.gptq_experts
        return shape[-2] if len(shape) == 3 and experts and experts.fused and experts.matches(name) else None

    return input_size


def beats_rtn(ppl_ratio: float, rtn_ppl_ratio: float) -> list[str]:
    """GPTQ that is no better than round-to-nearest on the same grid is broken, whatever the budget says."""
    if rtn_ppl_ratio > RTN_SIGNAL and ppl_ratio >= rtn_ppl_ratio:
        return [f"perplexity ratio {ppl_ratio:.4f} is not below round-to-nearest's {rtn_ppl_ratio:.4f} on the same "
                f"grid: the GPTQ solve did not help (check the calibration data and damp)"]  # fmt: skip
    return []


def rtn_quality(reference, quantization: dict) -> dict[str, Any]:
    """The quality figures of round-to-nearest on the same source weights, bits, groups and text."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.quantizers.gptq import QuantSpec, rtn
    from pipeline.quantizers.layers import transposed
    from pipeline.runtimes.transformers import TorchRuntime
    from pipeline.validate import compare

    spec = QuantSpec(bits=quantization["bits"], group_size=quantization["group_size"], sym=quantization["sym"])
    model = AutoModelForCausalLM.from_pretrained(reference.source, dtype=torch.float32).eval()
    row = arch(model.config.model_type)
    experts = row.gptq_experts
    listed = quantization.get("modules_in_block_to_quantize")  # where some linears stayed in float: those quantized
    linears = tuple(listed[0]) if listed else row.gptq_linears
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and quantized_weight(row, f"{name}.weight", linears):
                module.weight.data = rtn(module.weight.data, spec).dequantized
            elif experts and name.endswith(f".{experts.module}.experts"):  # fused: rows stay rows, one slice per expert
                flip = transposed(module, experts)  # [experts, in, out]: a linear's rows are the slice's columns
                for fused in (module.gate_up_proj, module.down_proj):
                    for expert in range(len(fused)):
                        weight = fused.data[expert].T if flip else fused.data[expert]
                        weight = rtn(weight, spec).dequantized
                        fused.data[expert] = weight.T if flip else weight
    return compare(reference, TorchRuntime(model, {"runtime": "transformers (round-to-nearest)"}))


def gptq_files(folder: Path, manifest: Manifest, chat: dict[str, Any]) -> dict[str, str]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    name = handoff.model_name(manifest)
    vllm = handoff.vllm_command("--quantization", "gptq", "--served-model-name", name, "--max-model-len",
                                str(chat["context"]))  # fmt: skip
    xinference = {
        "version": 2,
        "context_length": chat["context"],
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"] if chat["template"] else ["generate"],
        "model_description": f"{manifest.model} GPTQ int{config['bits']} (group {config['group_size']}) by weightsmith",
        "model_family": "other",
        "model_specs": [{"model_format": "gptq", "model_size_in_billions": handoff.xinference_size(manifest),
                         "quantization": f"Int{config['bits']}", "model_uri": chat["published"].as_uri()}],
        "chat_template": chat["template"],
        "stop_token_ids": chat["stop_ids"],
        "stop": chat["stop"],
    }  # fmt: skip
    title = f"Load {manifest.model} GPTQ int{config['bits']} with transformers (needs gptqmodel and optimum)."
    snippet = f'''"""{title}"""
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

path = Path(__file__).resolve().parent  # this artifact's folder
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, device_map="auto")
messages = [{{"role": "user", "content": "What is the capital of France?"}}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt").to(model.device)
print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0, ids.shape[1]:], skip_special_tokens=True))
'''
    files = {"xinference.json": json.dumps(xinference, indent=2) + "\n", "transformers_example.py": snippet}
    if manifest.serving["vllm"].accepts:
        files["vllm-serve.sh"] = handoff.script(vllm)
    return files
