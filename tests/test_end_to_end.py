"""The user's path: `weightsmith convert RECIPE` runs the Prefect flow (ephemeral, no server) end to end.

CI runs the bundled recipe's core targets (`CORE`: GGUF with the importance matrix and llama.cpp's server, ONNX,
GPTQ, and compressed-tensors made from the GPTQ target; about a third of the demo's time, to keep CI within its
hour); `WEIGHTSMITH_E2E=full make test` runs all of them, as `make demo` does. The targets left out of CORE are each
built and validated by their format's own tests (MLX and its server: test_mlx, test_serve; TensorRT:
test_tensorrt*).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, write_recipe

RUNTIMES = {
    "gguf": "llama.cpp",
    "mlx": "mlx-lm",
    "onnx": "onnxruntime",
    "gptq": "transformers",
    "tensorrt": "transformers",
    "compressed": "transformers",
}
EXPECTED = {"tensorrt": "not_run"}  # the checkpoint is validated; the engine needs a CUDA worker
CORE = ["gguf/q8_0", "gguf/q4_k_m", "gguf/q4_k_m-imatrix", "onnx/fp32", "gptq/int4", "compressed/w4a16"]
FULL = os.environ.get("WEIGHTSMITH_E2E") == "full"


def key(target: dict) -> str:
    return f"{target['format']}/{target.get('name', target['quant'])}"


def convert(recipe_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "convert", str(recipe_path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=2400,  # about 17 minutes on an idle 2-core machine
    )


@pytest.mark.slow
def test_bundled_smollm2_recipe_through_prefect(smollm2_dir, tmp_path):
    recipe = yaml.safe_load((REPO / "recipes" / "smollm2.yaml").read_text())
    recipe["output"] = str(tmp_path / "artifacts")
    path = tmp_path / "smollm2.yaml"
    path.write_text(yaml.safe_dump(recipe))

    run = convert(path, *([] if FULL else [arg for k in CORE for arg in ("--only", k)]))
    assert run.returncode == 0, run.stdout + run.stderr
    model_dir = tmp_path / "artifacts" / "smollm2-135m"
    manifests = {}
    targets = [t for t in recipe["targets"] if FULL or key(t) in CORE]
    assert len(targets) == (len(recipe["targets"]) if FULL else len(CORE))
    for target in targets:
        folder = f"{target['format']}-{target.get('name', target['quant'])}"
        manifest = json.loads((model_dir / folder / "manifest.json").read_text())
        assert manifest["status"] == EXPECTED.get(target["format"], "ok"), manifest["reason"]
        assert manifest["quality"]["ppl_ratio"] <= recipe["validation"]["budgets"][manifest["target"]]["max_ppl_ratio"]
        assert 10 < manifest["quality"]["ppl_source"] < 40
        assert manifest["quality"]["n_tokens"] >= (500 if target["format"] == "mlx" else 2000)  # MLX CPU: 1 context
        assert (
            manifest["smoke"]["tokenizer"] is None
            or manifest["smoke"]["tokenizer"]["matches"]
            or (manifest["budget"]["exact_tokenizer"] is False)
        )
        assert manifest["validated_on"]["runtime"].startswith(RUNTIMES[target["format"]])
        assert manifest["target"] in run.stdout
        manifests[manifest["target"]] = manifest
    assert manifests["gguf/q8_0"]["smoke"]["chat_template"]["matches"]  # GGUF carries its own template
    for name, manifest in manifests.items():  # the real servers answered as our runtimes did (see test_serve)
        if manifest["format"] in ("gguf", "mlx"):
            assert manifest["steps"]["serve"] == "ok", (name, manifest["serve"])
    assert "Paris" in manifests["gguf/q8_0"]["serve"]["cases"][0]["text"]
    assert "Paris" in manifests["gguf/q8_0"]["smoke"]["generation"]["cases"][0]["text"]
    assert "Paris" in manifests["onnx/fp32"]["smoke"]["generation"]["cases"][0]["text"]
    assert manifests["onnx/fp32"]["quality"]["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
    if FULL:
        assert "Paris" in manifests["mlx/q8"]["smoke"]["generation"]["cases"][0]["text"]
        assert manifests["mlx/q8"]["smoke"]["runtime"]["backend"] == "cpu"  # mlx[cpu] on this Linux machine
        assert manifests["onnx/int4"]["smoke"]["runtime"]["flavour"] == "genai"
        assert manifests["onnx/fp16"]["build"] == {**manifests["onnx/fp16"]["build"], "flavour": "standard",
                                                   "precision": "fp16"}  # fmt: skip
        assert manifests["onnx/fp16"]["quality"]["ppl_ratio"] == pytest.approx(1.0, abs=2e-3)
        assert "Paris" in manifests["onnx/fp16"]["smoke"]["generation"]["cases"][0]["text"]
        assert manifests["mlx/q4"]["build"]["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
        assert manifests["gguf/f16"]["quality"]["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
    imatrix, plain = manifests["gguf/q4_k_m-imatrix"], manifests["gguf/q4_k_m"]
    assert imatrix["build"]["imatrix"]["chunks"] == 32
    assert (model_dir / "gguf-q4_k_m-imatrix" / "imatrix.gguf").is_file()
    assert imatrix["quality"]["ppl_ratio"] < plain["quality"]["ppl_ratio"]  # the importance matrix helped here
    assert imatrix["quality"]["kl_mean"] < plain["quality"]["kl_mean"]
    for quant in ("int8", "int4") if FULL else ("int4",):  # GPTQ: loaded by transformers with GPTQModel's kernel
        gptq = manifests[f"gptq/{quant}"]
        assert "gptqmodel" in gptq["smoke"]["validated_by"]
        assert gptq["build"]["calibration"]["samples"] == 32 and len(gptq["build"]["layers"]) == 30
    assert manifests["gptq/int4"]["quality"]["ppl_ratio"] < manifests["gptq/int4"]["quality"]["rtn_ppl_ratio"] - 0.1
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["ok"] and [r["status"] for r in summary["targets"]] == [
        EXPECTED.get(t["format"], "ok") for t in targets
    ]
    if FULL:
        for trt in ("tensorrt/fp16", "tensorrt/w4a16_gptq"):
            assert "no_cuda_device" in manifests[trt]["reason"]
            assert not (model_dir / trt.replace("/", "-") / "engine").exists()
        assert manifests["tensorrt/w4a16_gptq"]["quality"]["ppl_ratio"] == pytest.approx(
            manifests["gptq/int4"]["quality"]["ppl_ratio"], abs=0.01
        )  # the GPTQ weights, carried over unchanged
    assert manifests["compressed/w4a16"]["quality"]["ppl_ratio"] == pytest.approx(
        manifests["gptq/int4"]["quality"]["ppl_ratio"], abs=1e-3
    )  # the same levels and scales in compressed-tensors' pack-quantized layout
    assert "compressed-tensors" in manifests["compressed/w4a16"]["smoke"]["validated_by"]
    if FULL:
        assert "compressed-tensors" in manifests["compressed/fp8"]["smoke"]["validated_by"]
    assert "report: " in run.stdout and "log: " in run.stdout and "Traceback" not in run.stderr + run.stdout


def test_failed_budget_fails_the_flow_run(tiny_llama, tmp_path):
    path = write_recipe(tmp_path, tiny_llama, [("gguf", "q4_0")], budgets={"gguf/q4_0": {"max_ppl_ratio": 1.0000001}})
    run = convert(path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "failed: gguf/q4_0 (exit 1;" in run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert "failed" in run.stdout and "perplexity ratio" in run.stdout
