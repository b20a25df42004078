"""ONNX: export time and peak RSS per flavour, and greedy tokens/s of the onnxruntime CPU run vs transformers.

    python bench/onnx_export.py [--source bundled:smollm2-135m] [--tokens 32]

Each export runs in a fresh process (the pipeline's own `build()`); wall time is measured around it and peak RSS is
the child's high-water mark (VmHWM). Generation speed: the same chat prompt, the same number of new tokens (no early
stop), greedy, on this machine's CPU: transformers (float32, its KV cache) against onnxruntime (our KV-cache loop
for the standard graph; onnxruntime-genai's generator for the genai flavour).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import build_one  # noqa: E402
from bench.common import measure, print_table  # noqa: E402

FLAVOURS = [
    ("standard", "fp32", {}),
    ("standard", "fp16", {"flavour": "standard"}),
    ("genai", "fp32", {"flavour": "genai"}),
    ("genai", "int4", {"block_size": 32}),
]
PROMPT = "Write one sentence about the sea."


def tokens_per_second(generate, n: int) -> float:
    generate(4)  # warm-up
    start = time.perf_counter()
    produced = len(generate(n))
    return produced / (time.perf_counter() - start)


def main() -> None:

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.reference import render_prompt
    from pipeline.runtimes.onnxruntime import OnnxRuntime
    from pipeline.source import load_tokenizer, resolve_source
    from pipeline.types import SourceSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="bundled:smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    source = resolve_source(SourceSpec(id=args.source))
    tokenizer = load_tokenizer(source.path)
    ids = tokenizer(render_prompt(tokenizer, PROMPT), add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()

    def hf_generate(n):
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(ids) :].tolist()

    reference_speed = tokens_per_second(hf_generate, args.tokens)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, quant, options in FLAVOURS:
            out = Path(tmp, f"{kind}-{quant}")
            out.mkdir()
            wall, rss = measure(build_one.command(source.path, "onnx", quant, options, out), env)
            size = sum(f.stat().st_size for f in out.glob("model.onnx*"))
            runtime = OnnxRuntime(out)
            speed = tokens_per_second(lambda n, r=runtime: r.greedy(ids, n, stop_ids=set()), args.tokens)
            rows.append([kind, quant, f"{wall:.1f}", f"{rss:.0f}", f"{size / 1e6:.1f}", f"{speed:.1f}",
                         f"{reference_speed:.1f}"])  # fmt: skip
    print(f"source: {source.spec} ({source.n_params / 1e6:.1f}M parameters); onnxruntime {version('onnxruntime')}, "
          f"onnxruntime-genai {version('onnxruntime-genai')}, torch {torch.__version__}; {os.cpu_count()} CPUs; "
          f"{args.tokens} new tokens, greedy")  # fmt: skip
    print_table(["flavour", "precision", "export_s", "peak_rss_mb", "size_mb", "ort_tokens_per_s",
                 "transformers_tokens_per_s"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
