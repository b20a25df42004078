"""Memory as the model grows: every stage of a recipe on random bf16 checkpoints of growing size.

    python bench/scale.py [--sizes 0.5,1.5,3] [--targets gguf/f16,gguf/q4_k_m,gptq/int4,mlx/q4,onnx/fp32]
                          [--gptq-layers 3] [--reference auto]

For each size a random Llama-style checkpoint (SmolLM2's tokenizer and vocabulary, bf16, 2 GB shards as the hub
shards them) is written tensor by tensor, never whole in memory. Each stage then runs in a process of its own (wall
time around it, peak RSS over it and its children, see bench/common.py): the reference (the source run on 256
held-out tokens and one prompt, cached on disk for the validations), and each target's build and validation. The
table's last column divides the peak by the largest shard plus the largest decoder layer: the memory a streaming
stage cannot avoid. A stage that streams keeps it flat as the model grows; one that loads the whole model grows
with it.

On 2 CPUs a GPTQ build of a 1B model takes about an hour, so with `--gptq-layers N` the build is stopped (SIGKILL)
once N layers are finished (GPTQ keeps each finished layer on disk, see pipeline/quantizers/resume.py) and the row
says so; memory per layer is flat by then, since each layer is loaded, quantized and let go the same way. Its
validation is then not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import measure as common_measure  # noqa: E402
from bench.common import print_table  # noqa: E402

SHARD = 2 * 1024**3
# parameters (billions) -> hidden, intermediate, layers, heads, kv heads
SHAPES = {0.5: (1024, 4096, 24, 16, 4), 1.5: (2048, 5632, 28, 16, 4), 3: (3072, 8192, 26, 24, 8),
          7: (4096, 11008, 32, 32, 8)}  # fmt: skip
VALIDATION = {"eval_tokens": 256, "context": 128, "max_new_tokens": 8, "prompts": ["Hello there."]}
CALIBRATION = {"samples": 32, "seq_len": 512}


def make_checkpoint(folder: Path, billions: float, tokenizer: Path) -> dict:
    """A random bf16 Llama-style checkpoint in 2 GB shards, written tensor by tensor; returns its sizes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, inter, layers, heads, kv = SHAPES[billions]
    config = AutoConfig.for_model(
        "llama", vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )  # fmt: skip
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer / name).is_file():
            (folder / name).write_bytes((tokenizer / name).read_bytes())
    generator = torch.Generator().manual_seed(0)
    shards, pending, size = [], {}, 0
    for name, shape in shapes.items():
        std = 1.0 if "norm" in name else 0.02
        tensor = (torch.randn(shape, generator=generator) * std + (1.0 if "norm" in name else 0.0)).bfloat16()
        if pending and size + tensor.nbytes > SHARD:
            shards.append(pending)
            save_file(pending, folder / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            pending, size = {}, 0
        pending[name], size = tensor, size + tensor.nbytes
    shards.append(pending)
    save_file(pending, folder / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        final = folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{i + 1}.safetensors").rename(final)
        weight_map.update(dict.fromkeys(shard, final.name))
        total += sum(t.nbytes for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    layer = sum(shapes[n].numel() for n in shapes if n.startswith("model.layers.0.")) * 2
    return {"params": sum(s.numel() for s in shapes.values()), "largest_shard": max(
        sum(t.nbytes for t in s.values()) for s in shards), "largest_layer": layer}  # fmt: skip


def measure(cmd: list[str], stop_when=None) -> tuple[float, float, bool]:
    """(wall seconds, peak RSS MB, stopped) of one stage's process tree (bench.common.measure); stopped: killed by
    `stop_when` (its finished layers are still on disk; a completed GPTQ build removes them)."""
    wall, peak = common_measure(cmd, {**os.environ, "PYTHONPATH": str(REPO)}, stop_when)
    return wall, peak, stop_when is not None and stop_when()


def stage(argv: list[str]) -> None:
    """One stage in this process: `reference SOURCE MODE`, `build SOURCE TARGET OUT WORK`, `validate SOURCE TARGET
    ARTIFACT MODE`."""
    from pipeline.formats.base import BuildContext, Format
    from pipeline.reference import reference
    from pipeline.source import inspect_checkpoint
    from pipeline.types import Calibration, Target

    kind, source = argv[0], inspect_checkpoint(Path(argv[1]))
    if kind == "reference":
        reference(source, validation(argv[2]))
        return
    fmt_name, quant = argv[2].split("/")
    fmt = Format.for_target(Target(format=fmt_name, quant=quant))
    if kind == "build":
        fmt.check(source)
        fmt.build(source, Path(argv[3]), BuildContext(name="bench", calibration=Calibration(**CALIBRATION),
                                                      work=Path(argv[4])))  # fmt: skip
    else:
        mode = validation(argv[4])
        result = fmt.validate(Path(argv[3]), reference(source, mode), mode)
        print(json.dumps(result.get("quality", {})))


def validation(mode: str):
    from pipeline.types import Validation

    fields = Validation.model_fields
    return Validation(**VALIDATION, **({"reference": mode} if "reference" in fields else {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5,1.5,3")
    parser.add_argument("--targets", default="gguf/f16,gguf/q4_k_m,gptq/int4,mlx/q4,onnx/fp32")
    parser.add_argument("--gptq-layers", type=int, default=3, help="stop GPTQ after this many layers (0: all)")
    parser.add_argument("--reference", default="auto", help="the reference's mode, where the recipe has that field")
    parser.add_argument("--workdir", default=None, help="where checkpoints and artifacts go (default: a temp folder)")
    args = parser.parse_args()
    from pipeline.source import resolve_source
    from pipeline.types import SourceSpec

    tokenizer = resolve_source(SourceSpec(id="bundled:smollm2-135m")).path
    here = [sys.executable, __file__, "--stage"]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        os.environ["WEIGHTSMITH_CACHE"] = str(Path(tmp) / "cache")  # the stages' reference cache, thrown away after
        for billions in map(float, args.sizes.split(",")):
            billions = int(billions) if billions.is_integer() else billions
            source = Path(tmp) / f"random-{billions}b"
            sizes = make_checkpoint(source, billions, tokenizer)
            floor = (sizes["largest_shard"] + sizes["largest_layer"]) / 1024**2
            label = f"{sizes['params'] / 1e9:.2f}B"

            def row(name: str, measured: tuple[float, float, bool], note: str = "", label=label, floor=floor) -> None:
                wall, peak, _ = measured
                rows.append([name, label, f"{wall:.0f}", f"{peak / 1024:.2f}", f"{peak / floor:.1f}", note])
                print_table(["stage", "model", "wall s", "peak GB", "x (shard+layer)", "note"], rows[-1:])

            row("reference", measure([*here, "reference", str(source), args.reference]), f"mode {args.reference}")
            for target in args.targets.split(","):
                out, work = Path(tmp) / target.replace("/", "-"), Path(tmp) / f"{target.replace('/', '-')}.layers"
                out.mkdir()
                stop = None
                if target.startswith("gptq") and args.gptq_layers:
                    stop = lambda work=work: len(list(work.glob("layer-*.safetensors"))) >= args.gptq_layers  # noqa: E731
                built = measure([*here, "build", str(source), target, str(out), str(work)], stop)
                row(f"{target} build", built, f"stopped after {args.gptq_layers} layers" if built[2] else "")
                if not built[2]:
                    row(f"{target} validate", measure([*here, "validate", str(source), target, str(out),
                                                       args.reference]))  # fmt: skip
                for path in (out, work):
                    subprocess.run(["rm", "-rf", str(path)], check=True)
            subprocess.run(["rm", "-rf", str(source)], check=True)
    print()
    print_table(["stage", "model", "wall s", "peak GB", "x (shard+layer)", "note"], rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stage"]:
        stage(sys.argv[2:])
    else:
        main()
