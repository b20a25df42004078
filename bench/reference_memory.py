"""Peak memory of the reference pass, whole model against one decoder layer at a time (issue 18).

    python -m bench.reference_memory [--layers 24] [--hidden 1024]

Makes a random Llama in bfloat16 in a temporary folder (the defaults: 24 layers of width 1024, the SmolLM2 tokenizer's
49k vocabulary, about 400M parameters; nothing is kept), computes its reference in float32 each way in a fresh
process, and prints each one's wall time and peak RSS, and how far the two references are apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.common import measure, print_table

VALIDATION = {"eval_tokens": 1024, "context": 512, "max_new_tokens": 8}


def make_model(folder: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.source import resolve_source
    from pipeline.types import SourceSpec

    smol = resolve_source(SourceSpec(id="bundled:smollm2-135m")).path
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False, initializer_range=0.05)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smol / name).is_file():
            (folder / name).write_bytes((smol / name).read_bytes())
    return folder


def run_one(folder: str, how: str, out: str) -> None:
    """Compute the reference of the checkpoint in `folder` the way `how` says; save it under `out`."""
    from pipeline import reference_stream
    from pipeline.corpus import load_text
    from pipeline.reference import _compute
    from pipeline.source import inspect_checkpoint
    from pipeline.types import Validation

    validation = Validation(**VALIDATION, reference=how)
    source = inspect_checkpoint(Path(folder))
    held_out = load_text(validation.held_out, "held_out")
    compute = reference_stream.compute if how == "streamed" else _compute
    compute(source, validation, "float32", held_out).save(Path(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # folder, how, out: the measured child
    args = parser.parse_args()
    if args.one:
        return run_one(*args.one)
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model", args.layers, args.hidden)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        rows, refs = [], {}
        for how in ("whole", "streamed"):
            out = Path(tmp) / how
            out.mkdir()
            wall, peak = measure([sys.executable, "-m", "bench.reference_memory", "--one", str(model), how, str(out)])
            refs[how] = out
            rows.append([how, f"{wall:.1f}", f"{peak:.0f}"])
        a, b = (np.load(refs[h] / "top_logprobs.npy") for h in ("whole", "streamed"))
        ids = [np.load(refs[h] / "top_ids.npy")[..., 0] for h in ("whole", "streamed")]
        prompts = [[p["expected"] for p in json.loads((refs[h] / "reference.json").read_text())["prompts"]]
                   for h in ("whole", "streamed")]  # fmt: skip
        print(f"random llama, {args.layers} layers x {args.hidden}, {size / 1e6:.0f} MB of bfloat16; "
              f"reference in float32, {VALIDATION}")  # fmt: skip
        print_table(["reference", "wall s", "peak RSS MB"], rows)
        print(f"max |d top logprob| {np.abs(a - b).max():.2e}, top-1 ids equal: {bool((ids[0] == ids[1]).all())}, "
              f"continuations equal: {prompts[0] == prompts[1]}")  # fmt: skip


if __name__ == "__main__":
    main()
