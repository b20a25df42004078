"""GGUF export: our streaming writer vs llama.cpp's own convert_hf_to_gguf.py, side by side on the same checkpoint.

    python bench/gguf_export.py [--source bundled:smollm2-135m] [--types f16,q8_0] [--repeat 1]

The reference converter is taken from the llama-cpp-python sdist of the installed version (it vendors llama.cpp,
its conversion package and gguf-py), downloaded once with pip into the weightsmith cache. Each export runs in a fresh
process; wall time is measured around it and peak RSS is the child's own high-water mark (VmHWM).
The last column says whether every tensor's data is byte-identical between the two files (metadata and tensor order
may differ between writers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OURS = """
import sys
from pathlib import Path
from pipeline.formats import gguf
from pipeline.recipe import Target
from pipeline.source import inspect_checkpoint
source, target = inspect_checkpoint(Path(sys.argv[1])), Target(format="gguf", quant=sys.argv[2])
gguf.build(source, target, Path(sys.argv[3]), name="bench")
"""


def reference_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python sdist matching the installed version."""
    from pipeline.source import cache_root

    release = version("llama-cpp-python")
    root = cache_root() / "bench" / f"llama.cpp-{release}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-q",
                "-d",
                tmp,
                f"llama-cpp-python=={release}",
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(sdist) as tar:
            members = [
                m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(root, members=members, filter="data")
    return script


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process; raises if it fails. The peak is the child's own VmHWM,
    polled from /proc: rusage's maxrss would include this (larger) parent's RSS at fork time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak_kb = 0
    while proc.poll() is None:
        peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
        time.sleep(0.01)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, peak_kb / 1024


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def tensors_identical(a: Path, b: Path) -> str:
    import gguf

    ours = {t.name: t for t in gguf.GGUFReader(a).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(b).tensors}
    same = sum(
        1
        for name, t in theirs.items()
        if name in ours and ours[name].tensor_type == t.tensor_type and bytes(ours[name].data) == bytes(t.data)
    )
    return f"{same}/{len(theirs)}" + (
        "" if set(ours) == set(theirs) else f" (names differ: {len(set(ours) ^ set(theirs))})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="bundled:smollm2-135m")
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and type; the best wall time is shown")
    args = parser.parse_args()

    from pipeline.recipe import SourceSpec
    from pipeline.source import resolve_source

    source = resolve_source(SourceSpec(id=args.source))
    converter = reference_converter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.types.split(","):
            out_ours, out_ref = Path(tmp, f"ours-{quant}"), Path(tmp, f"ref-{quant}.gguf")
            out_ours.mkdir()
            ours = [
                measure([sys.executable, "-c", OURS, str(source.path), quant, str(out_ours)], env)
                for _ in range(args.repeat)
            ]
            ref = [
                measure(
                    [sys.executable, str(converter), str(source.path), "--outtype", quant, "--outfile", str(out_ref)]
                )
                for _ in range(args.repeat)
            ]
            (ours_file,) = out_ours.glob("*.gguf")
            identical = tensors_identical(ours_file, out_ref)
            for tool, runs, path in (("weightsmith", ours, ours_file), ("convert_hf_to_gguf.py", ref, out_ref)):
                rows.append(
                    [
                        quant,
                        tool,
                        f"{min(r[0] for r in runs):.2f}",
                        f"{max(r[1] for r in runs):.0f}",
                        f"{path.stat().st_size / 1e6:.1f}",
                        identical,
                    ]
                )

    header = ["type", "tool", "wall_s", "peak_rss_mb", "size_mb", "identical_tensors"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(
        f"source: {source.spec} ({source.n_params / 1e6:.1f}M parameters, {source.dtype}); "
        f"llama.cpp converter from llama-cpp-python {version('llama-cpp-python')}; {os.cpu_count()} CPUs"
    )
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
