"""GPTQ on CPU: our quantizer vs GPTQModel, on the same model, calibration samples, bits, groups and act-order.

    python bench/gptq.py [--source bundled:smollm2-135m] [--bits 4,8] [--group-size 64] [--samples 32] [--seq-len 512]

Each quantizer runs in a fresh process (wall time around it; peak RSS over it and its children) through the same
`build()` the pipeline runs, so both write the same GPTQ v1 layout from the same calibration samples (the recipe
default: 32×512 tokens of the built-in corpus, seed 0). Ours runs twice, with one and with two solver threads.
Every artifact is then scored the same way, by transformers' GPTQ loader with GPTQModel's exact `torch` kernel in
float32, on the held-out text (2048 tokens, 512-token windows); round-to-nearest on the same grid is the floor.
auto-gptq is not run: 0.7.1 (archived) cannot quantize without CUDA and needs transformers <= 4.40.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import build_one  # noqa: E402
from bench.common import measure, print_table  # noqa: E402


def score(folder: Path, reference) -> dict:
    from pipeline.runtimes.transformers import open_gptq
    from pipeline.validate import compare

    return compare(reference, open_gptq(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="bundled:smollm2-135m")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    from pipeline.formats.gptq import rtn_quality
    from pipeline.reference import reference
    from pipeline.runtimes.transformers import cpu_workers
    from pipeline.source import resolve_source
    from pipeline.types import Calibration, SourceSpec, Validation

    cpu_workers()
    source = resolve_source(SourceSpec(id=args.source))
    ref = reference(source, Validation())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {"weightsmith, 1 solver thread": {"threads": 1}, "weightsmith, 2 solver threads": {"threads": 2},
            f"GPTQModel {version('gptqmodel')}": {"quantizer": "gptqmodel"}}  # fmt: skip
    rows, source_ppl = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for bits in map(int, args.bits.split(",")):
            grid = {"group_size": args.group_size, "desc_act": True, "static_groups": True}
            floor = rtn_quality(ref, {"bits": bits, "group_size": args.group_size, "sym": True})
            source_ppl = floor["ppl_source"]
            results = {}
            for tool, options in runs.items():
                out = Path(tmp, f"int{bits}-{len(results)}")
                out.mkdir()
                cmd = build_one.command(source.path, "gptq", f"int{bits}", {**grid, **options}, out,
                                        Calibration(samples=args.samples, seq_len=args.seq_len))  # fmt: skip
                results[tool] = (*measure(cmd, env), score(out, ref))
            reference_wall = results[f"GPTQModel {version('gptqmodel')}"][0]
            rows.append([f"int{bits}", "round-to-nearest (floor)", "-", "-", f"{floor['ppl']:.3f}",
                         f"{floor['ppl_ratio']:.4f}", "-"])  # fmt: skip
            for tool, (wall, rss, quality) in results.items():
                rows.append([f"int{bits}", tool, f"{wall:.1f}", f"{rss:.0f}", f"{quality['ppl']:.3f}",
                             f"{quality['ppl_ratio']:.4f}", f"{reference_wall / wall:.2f}x"])  # fmt: skip
    print(f"source: {source.spec} ({source.n_params / 1e6:.1f}M parameters, held-out ppl {source_ppl:.3f} in fp32); "
          f"calibration {args.samples}x{args.seq_len} tokens; group {args.group_size}, desc_act + static_groups, "
          f"sym; torch {version('torch')}, {os.cpu_count()} CPUs")  # fmt: skip
    print_table(["bits", "quantizer", "wall_s", "peak_rss_mb", "ppl", "ppl_ratio", "speed_vs_gptqmodel"], rows)


if __name__ == "__main__":
    main()
