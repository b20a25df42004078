"""GGUF export and the quant ladder: our pipeline vs llama.cpp's own tools, side by side on the same checkpoint.

    python bench/gguf_export.py [--source bundled:smollm2-135m] [--types f16,q8_0,q4_0,q4_k_m,q5_k_m,q6_k]

Reference tools, both from the llama-cpp-python sdist of the installed version (it vendors llama.cpp), fetched and
built once into the weightsmith cache: `convert_hf_to_gguf.py` (for f16/bf16/q8_0 directly; for the other types it
writes the F16 input) and `llama-quantize` (compiled with CMake, as llama.cpp ships it). Our side runs the same
`build()` the pipeline runs, with an F16 base for the quantized types so both start from the same F16 input.

Each tool runs in a fresh process: wall time is measured around it, peak RSS is the child's own high-water mark
(VmHWM). For the two-step reference, time is the sum and RSS the larger of the two. Perplexity is measured on the
held-out corpus text with llama.cpp (llama-cpp-python) for both files. The last column says whether every tensor's
data is byte-identical between the two files (metadata and tensor order may differ between writers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import build_one  # noqa: E402
from bench.common import measure, print_table  # noqa: E402

CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]  # fmt: skip


def llama_cpp_tree() -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist matching the installed version."""
    from pipeline.files import cache_root

    release = version("llama-cpp-python")
    root = cache_root() / "bench" / f"llama.cpp-{release}"
    if (root / "CMakeLists.txt").is_file():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
                        f"llama-cpp-python=={release}"], check=True)  # fmt: skip
        (sdist,) = Path(tmp).glob("*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(root, members=members, filter="data")
    return root


def llama_quantize_tool(tree: Path) -> Path:
    binary = tree / "build" / "bin" / "llama-quantize"
    if not binary.is_file():
        print("building llama-quantize from the vendored llama.cpp (a few minutes, once) ...", file=sys.stderr)
        subprocess.run(["cmake", "-S", str(tree), "-B", str(tree / "build"), *CMAKE_FLAGS], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        subprocess.run(["cmake", "--build", str(tree / "build"), "--target", "llama-quantize", "-j",
                        str(os.cpu_count())], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return binary


def tensors_identical(a: Path, b: Path) -> str:
    import gguf

    ours = {t.name: t for t in gguf.GGUFReader(a).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(b).tensors}
    same = sum(1 for name, t in theirs.items() if name in ours and ours[name].tensor_type == t.tensor_type
               and bytes(ours[name].data) == bytes(t.data))  # fmt: skip
    names = "" if set(ours) == set(theirs) else f" (names differ: {len(set(ours) ^ set(theirs))})"
    return f"{same}/{len(theirs)}{names}"


def perplexity(path: Path, ref) -> float:
    from pipeline.runtimes.llama_cpp import LlamaCppRuntime
    from pipeline.validate import compare

    runtime = LlamaCppRuntime(path, n_ctx=len(ref.chunks[0]))
    try:
        return compare(ref, runtime)["ppl"]
    finally:
        runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="bundled:smollm2-135m")
    parser.add_argument("--types", default="f16,q8_0,q4_0,q4_k_m,q5_k_m,q6_k")
    args = parser.parse_args()

    from pipeline.formats.gguf import DIRECT, model_files
    from pipeline.reference import reference
    from pipeline.source import resolve_source
    from pipeline.types import SourceSpec, Validation

    source = resolve_source(SourceSpec(id=args.source))
    tree = llama_cpp_tree()
    converter, quantize_tool = tree / "convert_hf_to_gguf.py", llama_quantize_tool(tree)
    ref = reference(source, Validation(prompts=["Hi"], max_new_tokens=1))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_f16 = Path(tmp, "ref-f16.gguf")
        convert_f16 = measure([sys.executable, str(converter), str(source.path), "--outtype", "f16", "--outfile",
                               str(ref_f16)])  # fmt: skip
        for quant in args.types.split(","):
            out_ours = Path(tmp, f"ours-{quant}")
            out_ours.mkdir()
            options = {} if quant in DIRECT else {"base": "f16"}  # both start from the same F16 input
            ours = measure(build_one.command(source.path, "gguf", quant, options, out_ours), env)
            out_ref = Path(tmp, f"ref-{quant}.gguf")
            if quant in DIRECT:
                theirs = measure([sys.executable, str(converter), str(source.path), "--outtype", quant, "--outfile",
                                  str(out_ref)])  # fmt: skip
                tool = "convert_hf_to_gguf.py"
            else:
                step = measure([str(quantize_tool), str(ref_f16), str(out_ref), quant.upper()])
                theirs = (convert_f16[0] + step[0], max(convert_f16[1], step[1]))
                tool = "convert_hf_to_gguf.py + llama-quantize"
            ours_file = model_files(out_ours)[0]
            identical = tensors_identical(ours_file, out_ref)
            for name, (wall, rss), path in (("weightsmith", ours, ours_file), (tool, theirs, out_ref)):
                rows.append([quant, name, f"{wall:.2f}", f"{rss:.0f}", f"{path.stat().st_size / 1e6:.1f}",
                             f"{perplexity(path, ref):.3f}", identical])  # fmt: skip

    n_tokens = sum(len(c) - 1 for c in ref.chunks)
    print(f"source: {source.spec} ({source.n_params / 1e6:.1f}M parameters, {source.dtype}); llama.cpp tools from "
          f"llama-cpp-python {version('llama-cpp-python')}; {os.cpu_count()} CPUs; ppl on {n_tokens} held-out "
          f"tokens (source model in transformers: {ref.ppl:.3f})")  # fmt: skip
    print_table(["type", "tool", "wall_s", "peak_rss_mb", "size_mb", "ppl", "identical_tensors"], rows)


if __name__ == "__main__":
    main()
