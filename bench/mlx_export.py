"""MLX conversion: our pipeline's stage vs calling mlx-lm's converter directly, on the same checkpoint.

    python bench/mlx_export.py [--source bundled:smollm2-135m] [--quants bf16,q8,q4]

Both run in a fresh process: ours is the `build()` the pipeline runs (mlx_lm.convert behind a shadow source folder
with a portable config, then the source's tokenizer files copied back), the reference is `python -m mlx_lm convert`.
The difference is the pipeline's overhead. Wall time is measured around each process; peak RSS is the child's own
high-water mark (VmHWM). The last column says whether every tensor of the two outputs is identical.
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


def reference_command(source: Path, quant: str, out: Path) -> list[str]:
    from pipeline.formats.mlx import BITS, FLOATS

    cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path", str(out)]
    if quant in FLOATS:
        return [*cmd, "--dtype", FLOATS[quant]]
    return [*cmd, "-q", "--q-bits", str(BITS[quant]), "--q-group-size", "64"]


def identical(a: Path, b: Path) -> str:
    import mlx.core as mx

    ours, theirs = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    same = sum(1 for k, v in theirs.items() if k in ours and mx.array_equal(ours[k], v).item())
    return f"{same}/{len(theirs)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="bundled:smollm2-135m")
    parser.add_argument("--quants", default="bf16,q8,q4")
    args = parser.parse_args()

    from pipeline.source import resolve_source
    from pipeline.types import SourceSpec

    source = resolve_source(SourceSpec(id=args.source))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants.split(","):
            ours_dir, ref_dir = Path(tmp, f"ours-{quant}"), Path(tmp, f"ref-{quant}")
            ours_dir.mkdir()
            ours = measure(build_one.command(source.path, "mlx", quant, {}, ours_dir), env)
            theirs = measure(reference_command(source.path, quant, ref_dir))
            same = identical(ours_dir, ref_dir)
            for tool, (wall, rss), folder in (("weightsmith", ours, ours_dir), ("mlx_lm convert", theirs, ref_dir)):
                size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
                rows.append([quant, tool, f"{wall:.2f}", f"{rss:.0f}", f"{size / 1e6:.1f}", same])
    print(f"source: {source.spec} ({source.n_params / 1e6:.1f}M parameters, {source.dtype}); mlx {version('mlx')}, "
          f"mlx-lm {version('mlx-lm')}; {os.cpu_count()} CPUs")  # fmt: skip
    print_table(["quant", "tool", "wall_s", "peak_rss_mb", "size_mb", "identical_tensors"], rows)


if __name__ == "__main__":
    main()
