"""MLX, Apple's array framework (mlx-lm, LM Studio, Xinference's MLX engine).

The conversion is mlx-lm's own (`mlx_lm.convert`): dtype conversion, affine quantization (2-8 bits, group size
32/64/128) and mlx-lm's mixed recipes (`mixed_4_6` ...: more bits for v_proj, down_proj and lm_head in the layers
llama.cpp's Q4_K_M favours). The folder it writes is what `mlx_lm.load` and LM Studio load: config.json with its
`quantization` block, safetensors, tokenizer, chat template, model card.

mlx-lm reads the source's config.json itself and, for the common architectures, takes `rope_theta` only from the
top level; transformers 5 writes it only under `rope_parameters`, and mlx-lm then silently uses its own default
(wrong logits, no error). So conversion reads the source through a shadow folder whose config.json carries the
portable keys (`pipeline.checkpoint.portable_config`), and the artifact keeps them. The artifact also gets the source's
own tokenizer files back: mlx-lm re-saves the tokenizer AutoTokenizer gave it, and for some configs transformers 5
swaps in a model-specific class with a different pre-tokenizer.

Which architectures: those whose row in `pipeline.archs` says mlx-lm has a module that loads the checkpoint, as
transformers saves it or rewritten by the row's data (`mlx_view`): the module's name where it is not the model_type,
a multimodal `text_config` wrapper, and tensor rewrites (`MlxTensors`: rename, split halves or interleaved rows,
transpose, stack per-expert tensors). What tiny transformers-5.24 checkpoints taught about mlx-lm 0.32.2 (the tests
in tests/test_mlx_archs.py hold it):
- mlx-lm's `sanitize` handles the layouts of the original releases, not always transformers 5's: its qwen3_5_moe
  splits a fused `experts.gate_up_proj` where transformers saves one linear per expert (stacked here); its gpt_oss
  reads MXFP4 `_blocks` where transformers saves float `gate_up_proj` [experts, in, 2·out] with gate and up columns
  interleaved (split and transposed here into mlx-lm's own layout, which it loads as is).
- mlx-lm's `llama4_text` module is a dense model (MobileLLM); Llama 4's experts live in its multimodal `llama4`
  module, which wants `text_config` and `language_model.` names, and assumes no rope on every 4th layer and top-1
  routing, as the release has. A text-only Qwen 3.5 is saved as `qwen3_5_text`, read by mlx-lm's `qwen3_5`.
- transformers 5 nests Gemma's rope settings per layer type and saves Gemma 4's global head size in
  `per_layer_config`; mlx-lm reads the release's `rope_theta`/`rope_local_base_freq`/`sliding_window_pattern`/
  `global_head_dim` and silently falls back to its defaults without them (`pipeline.checkpoint.portable_config`).
- mlx-lm folds constants into stored weights for some modules (Qwen 3.5's norms stored as 1 + w), so a float16 or
  bfloat16 artifact rounds after the fold: float16 logits differ from transformers' by up to ~1.5% of their range on
  the random tiny hybrids, where float32 matches to 1e-5.
- mlx-lm's YaRN rounds the correction range (transformers' `truncate: true`); gpt-oss's release config says
  `truncate: false`, and its logits then differ from transformers' (0.14 of a range of 10 on a tiny gpt-oss with the
  release's rope settings): the validation's budget judges it.

The artifact is validated with mlx-lm on whatever MLX backend
the worker has (`pipeline.runtimes.mlx`), which is recorded. Hand-off files: an `mlx_lm.server` script and a note
for LM Studio.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from pipeline import handoff
from pipeline.archs import Arch, MlxTensors, arch
from pipeline.checkpoint import portable_view
from pipeline.formats.base import BuildContext, Format, check_group_size, matrix_input, missing_modules, refuse_unless
from pipeline.formats.base import Options as BaseOptions
from pipeline.resources import ModelSize, Needs
from pipeline.runtimes.mlx import MlxRuntime, backend, package_version
from pipeline.types import Calibration, FormatError, Manifest, SourceInfo, Step, Validation

FLOATS = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
BITS = {"q2": 2, "q3": 3, "q4": 4, "q5": 5, "q6": 6, "q8": 8}
MIXED = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")  # mlx-lm's own recipes
SERVE_TOKENS = 12  # the serve check's reply length: MLX's CPU backend runs bf16 at about a second a token
CPU_EVAL_TOKENS = 512  # MLX's CPU backend ran this project's models at ~90 ms a token: one context, not all


class Options(BaseOptions):
    """Target options for MLX."""

    group_size: Literal[32, 64, 128] = 64  # values sharing one scale and bias (quantized quants)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"  # unquantized tensors (auto: the source's)


class MLX(Format):
    name = "mlx"
    quants = (*FLOATS, *BITS, *MIXED)
    extra = "mlx"
    library = "mlx"
    options_model = Options
    hardware = {Step.BUILD: ("apple", "cpu", "cuda"), Step.VALIDATE: ("apple", "cpu", "cuda")}
    server_script = "mlx-server.sh"
    server = "mlx_lm.server"
    options: Options

    @classmethod
    def check_options(cls, quant: str, options: Options) -> None:
        if quant in FLOATS and options.dtype not in ("auto", FLOATS[quant]):
            raise FormatError(f"mlx {quant} stores {FLOATS[quant]}: dtype {options.dtype} contradicts it")

    def missing_dependency(self, step: Step) -> str | None:
        why = missing_modules({"mlx.core": "mlx", "mlx_lm": "mlx-lm"}, self.extra)
        return why and f"{why} (mlx[cpu] on Linux)"

    def check(self, source: SourceInfo) -> None:
        refuse_unless(arch(source.model_type).mlx, "MLX", source.model_type, "mlx",
                      "mlx-lm has no module for it that loads transformers' checkpoint")  # fmt: skip
        module = mlx_module(source.model_type)
        config = source.config()
        for key, value in arch(source.model_type).mlx_requires.items():
            if config.get(key, value) != value:
                raise FormatError(f"MLX: mlx-lm's {module} assumes {key}: {value!r}, this checkpoint has "
                                  f"{config[key]!r}")  # fmt: skip
        if importlib.util.find_spec("mlx_lm") and not importlib.util.find_spec(f"mlx_lm.models.{loaded_as(module)}"):
            raise FormatError(f"MLX: the installed mlx-lm {package_version('mlx-lm')} has no module for "
                              f"{module!r}: upgrade mlx-lm")  # fmt: skip
        if self.quant not in FLOATS:
            check_group_size(source, self.options.group_size, language_model_input)

    def build(self, source: SourceInfo, out_dir: Path, ctx: BuildContext) -> dict[str, Any]:
        from mlx_lm import convert

        dtype = FLOATS.get(self.quant) or (None if self.options.dtype == "auto" else self.options.dtype)
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
            shadow = mlx_view(source.path, Path(scratch) / "source", source.model_type)
            converted = Path(scratch) / "converted"  # mlx-lm insists on creating its output folder itself
            convert(
                str(shadow),
                mlx_path=str(converted),
                quantize=self.quant not in FLOATS,
                q_group_size=self.options.group_size,
                q_bits=BITS.get(self.quant, 4),
                dtype=dtype,
                quant_predicate=self.quant if self.quant in MIXED else None,
                trust_remote_code=source.trust_remote_code,
            )
            for item in converted.iterdir():
                shutil.move(str(item), out_dir / item.name)
        for name in source.tokenizer_files:  # mlx-lm re-saves the tokenizer it loaded; AutoTokenizer may have swapped
            shutil.copy(source.path / name, out_dir / name)  # in a model-specific class: ship the source's own files
        config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
        quantization = config.get("quantization")
        return {
            "mlx_lm": package_version("mlx-lm"),
            "mlx": package_version("mlx"),
            "dtype": config.get("torch_dtype"),
            "quantization": {k: v for k, v in (quantization or {}).items() if not isinstance(v, dict)} or None,
            "built_with_backend": backend(),
        }

    def needs(self, size: ModelSize, validation: Validation, calibration: Calibration) -> Needs:
        """mlx-lm's convert loads the whole model as stored and quantizes it; validation on a CPU runs in float32."""
        stored_bits = 8 * size.stored / max(size.n_params, 1)
        bits = BITS[self.quant] + 0.5 if self.quant in BITS else 5 if self.quant in MIXED else stored_bits
        return Needs({Step.BUILD: 2 * size.stored, Step.VALIDATE: size.float32 + size.at_bits(bits)},
                     disk=size.at_bits(bits))  # fmt: skip

    def open_runtime(self, artifact: Path, reference, validation: Validation) -> MlxRuntime:
        return MlxRuntime(artifact)

    def eval_tokens(self, runtime: MlxRuntime) -> int | None:
        return CPU_EVAL_TOKENS if runtime.backend == "cpu" else None

    def serve(self, artifact: Path, manifest: Manifest, validation: Validation, log: Path) -> dict[str, Any]:
        """`mlx_lm.server` computes in the dtype the folder stores, where our validation on the CPU backend computes in
        float32: the replies it must give are mlx-lm's in the stored dtype, computed here first (and recorded)."""
        from pipeline.serve import serve_check

        chat = handoff.chat_info(manifest, artifact)
        tokens = min(validation.max_new_tokens, SERVE_TOKENS)
        expected = stored_dtype_replies(artifact, manifest.smoke or {}, chat["stop_ids"], tokens)
        outcome = serve_check(artifact / self.server_script, self.server, {"generation": {"cases": expected}},
                              chat["stop"], tokens, log)  # fmt: skip
        return {**outcome, "compared_with": "mlx-lm in the stored dtype, as the server computes"}

    def handoff_files(self, artifact: Path, manifest: Manifest, chat: dict[str, Any]) -> dict[str, str]:
        """An `mlx_lm.server` script (run from the artifact's folder) and a note for LM Studio."""
        server = ["mlx_lm.server", "--model", ".", "--host", "127.0.0.1", "--port", "8080"]
        note = (
            f"# LM Studio\n\nCopy or link this folder to "
            f"`~/.lmstudio/models/weightsmith/{handoff.model_name(manifest)}/` "
            "(LM Studio's `publisher/model` layout); it holds config.json with its quantization block, the "
            "safetensors weights, the tokenizer and the chat template, which is all LM Studio's MLX engine reads.\n"
        )
        return {"mlx-server.sh": handoff.script(server), "LMSTUDIO.md": note}


def mlx_module(model_type: str) -> str:
    """The mlx-lm module (its `model_type`) that loads a checkpoint of `model_type`."""
    return arch(model_type).mlx_module or model_type


def loaded_as(module: str) -> str:
    """The module file mlx-lm loads for model type `module`: mlx-lm maps some onto another (mistral onto llama)."""
    from mlx_lm.utils import MODEL_REMAPPING

    return MODEL_REMAPPING.get(module, module)


# where multimodal checkpoints keep their vision tower, which mlx-lm's text modules drop (their `sanitize`)
VISION_TOWERS = ("model.visual.", "vision_tower.", "model.vision_tower.")


def language_model_input(name: str, shape: tuple[int, ...]) -> int | None:
    """The input size of a language model matrix that mlx-lm quantizes (not the vision tower's), else None."""
    return None if name.startswith(VISION_TOWERS) else matrix_input(name, shape)


def mlx_view(source: Path, shadow: Path, model_type: str) -> Path:
    """The checkpoint as mlx-lm's module for it reads it: the portable config (`portable_view`) naming that module,
    wrapped as a multimodal config where the module wants one, and the weights rewritten where the row says so."""
    row, module = arch(model_type), mlx_module(model_type)
    portable_view(source, shadow)
    config = json.loads((shadow / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = module
    config.setdefault("rope_scaling", None)  # as transformers 4 wrote it; some mlx-lm modules require the key
    if row.mlx_text_config:
        config = {"model_type": module, "text_config": config, "tie_word_embeddings": config.get("tie_word_embeddings")}
    (shadow / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if row.mlx_tensors or row.mlx_text_config:
        rewrite_weights(shadow, row)
    return shadow


def rewrite_weights(shadow: Path, row: Arch, shard_bytes: int = 4 << 30) -> None:
    """Replace the shadow's links to the safetensors by shards of the rewritten tensors (`rewrite`): a copy of the
    checkpoint in the build's scratch folder (mlx-lm then loads the whole model anyway)."""
    import mlx.core as mx

    files = sorted(shadow.glob("*.safetensors"))
    weights = {name: value for file in files for name, value in mx.load(str(file.resolve())).items()}  # lazy
    for item in [*files, *shadow.glob("*.safetensors.index.json")]:
        item.unlink()
    weights = rewrite(weights, row.mlx_tensors, "language_model." if row.mlx_text_config else "")
    shards, size = [[]], 0
    for name in sorted(weights):
        if shards[-1] and size + weights[name].nbytes > shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append(name)
        size += weights[name].nbytes
    for number, names in enumerate(shards, 1):  # each shard's tensors are freed once it is written
        tensors = {name: weights.pop(name) for name in names}
        mx.save_safetensors(str(shadow / f"model-{number:05d}-of-{len(shards):05d}.safetensors"), tensors,
                            metadata={"format": "mlx"})  # fmt: skip


def rewrite(weights: dict, rules: tuple[MlxTensors, ...], prefix: str = "") -> dict:
    """The tensors renamed, split, transposed and stacked as `rules` say (see `MlxTensors`), names prefixed."""
    import mlx.core as mx

    out, stacks = {}, defaultdict(dict)
    for name, value in weights.items():
        rule, match = next(((r, m) for r in rules if (m := re.search(r.pattern, name))), (None, None))
        if rule is None:
            out[prefix + name] = value
        elif "expert" in match.groupdict():
            stacks[prefix + match.expand(rule.into[0])][int(match["expert"])] = value
        else:
            pieces = split(value, rule.split, rule.axis)
            if len(pieces) != len(rule.into):
                raise FormatError(f"MLX: the rewrite of {name} names {len(rule.into)} pieces for {len(pieces)}")
            for template, piece in zip(rule.into, pieces, strict=True):
                out[prefix + match.expand(template)] = mx.swapaxes(piece, -1, -2) if rule.transpose else piece
    for name, experts in stacks.items():
        if sorted(experts) != list(range(len(experts))):
            raise FormatError(f"MLX: the experts of {name} are not numbered 0..{len(experts) - 1}")
        out[name] = mx.stack([experts[e] for e in range(len(experts))])
    return out


def split(value, how: str, axis: int) -> list:
    """`value` whole, or its halves or interleaved (even, odd) slices along `axis`."""
    import mlx.core as mx

    if how == "halves":
        return mx.split(value, 2, axis=axis)
    if how == "interleaved":
        index = [slice(None)] * value.ndim
        pieces = []
        for start in (0, 1):
            index[axis] = slice(start, None, 2)
            pieces.append(mx.contiguous(value[tuple(index)]))
        return pieces
    return [value]


def stored_dtype_replies(artifact: Path, smoke: dict[str, Any], stop_ids: list[int],
                         max_new_tokens: int) -> list[dict[str, str]]:  # fmt: skip
    """mlx-lm's greedy replies to the smoke test's prompts, chat-templated, in the dtype the folder stores."""
    from pipeline.serve import PROMPTS

    runtime = MlxRuntime(artifact, stored_dtype=True)
    try:
        cases = []
        for case in smoke["generation"]["cases"][:PROMPTS]:
            ids = runtime.tokenizer.apply_chat_template([{"role": "user", "content": case["prompt"]}],
                                                        add_generation_prompt=True)  # fmt: skip
            out = runtime.greedy(list(ids), max_new_tokens, set(stop_ids))
            cases.append({"prompt": case["prompt"], "text": runtime.tokenizer.decode(out, skip_special_tokens=True)})
        return cases
    finally:
        runtime.close()
