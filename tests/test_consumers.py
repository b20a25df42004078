"""Real consumers: vLLM, in its own virtualenv, loads and serves our GPTQ int4 and compressed-tensors W4A16 and W8A8
artifacts through their own `vllm-serve.sh`, and refuses a checkpoint its loader does not take.

The tests marked `consumers` need `make vllm-venv` (~3.5 GB, ~5 min) and take minutes each (vLLM's start-up): they
are left out of `make test` (pyproject's addopts) and run by `make serve-check-consumers`; without the virtualenv they
skip, saying so. The unmarked tests check how vLLM's log is read, without vLLM.
"""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline import consumers
from pipeline import xinference_check as xinference
from pipeline.types import Manifest, Status
from tests.conftest import write_recipe

VLLM_MISSING = None if consumers.vllm_python().is_file() else (
    f"no vLLM virtualenv at {consumers.vllm_python()}: run `make vllm-venv` (or set {consumers.VLLM_PYTHON})"
)  # fmt: skip
needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")
XINFERENCE_MISSING = None if xinference.xinference_python().is_file() else (
    f"no Xinference virtualenv at {xinference.xinference_python()}: run `make xinference-venv`"
)  # fmt: skip
needs_xinference = pytest.mark.skipif(XINFERENCE_MISSING is not None, reason=XINFERENCE_MISSING or "")
BUDGET = {"max_ppl_ratio": 1.6}


@pytest.fixture(scope="module")
def published(tiny_model, tmp_path_factory):
    """The recipe run's output folder: GPTQ int4, compressed-tensors W4A16 (made from it) and W8A8 of a tiny llama
    whose sizes are multiples of 128 (vLLM's 4-bit kernels take its groups)."""
    import yaml

    from pipeline.convert import run_recipe
    from pipeline.recipe import load_recipe

    folder = tmp_path_factory.mktemp("consumers")
    path = write_recipe(folder, tiny_model("llama-256"), [("gptq", "int4"), ("compressed", "w4a16")],
                        budgets={"gptq/int4": BUDGET, "compressed/w4a16": BUDGET})  # fmt: skip
    data = yaml.safe_load(path.read_text())
    data["calibration"] = {"samples": 8, "seq_len": 128}
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    summary = run_recipe(recipe)
    assert summary["ok"], summary
    return recipe.output_dir()


@pytest.mark.consumers
@needs_vllm
@pytest.mark.parametrize(("target", "kernel"), [("gptq-int4", "cpu_gemm_wna16"),
                                                ("compressed-w4a16", "cpu_gemm_wna16"),
                                                ("smollm2/compressed-w8a8", "int8_scaled_mm")])  # fmt: skip
def test_vllm_verifies_loads_and_serves_the_artifact(request, target, kernel, tmp_path):
    """vLLM verifies the config, loads the weights and answers our greedy reply; where this vLLM build lacks the
    quantized kernel (its AVX2 CPU build), the reply is not_run naming it. W8A8 on SmolLM2: on the tiny random
    checkpoint vLLM's INT8 kernel (activations quantized per token) left our fake-quantized reply after 3 tokens
    (its next-token margins are a few hundredths), on SmolLM2 it gives our reply."""
    smollm2 = target.startswith("smollm2/")  # each fixture is built only for the tests that need it
    folder = request.getfixturevalue("smollm2_w8a8") if smollm2 else request.getfixturevalue("published") / target
    outcome = consumers.vllm_check(folder, tmp_path / "vllm.log")
    consumers.record(folder, "vllm", outcome)
    print(f"{target}: {consumers.summary(outcome)}")
    assert outcome["config"]["status"] == Status.OK, outcome["reason"]
    assert outcome["weights"]["status"] == Status.OK and outcome["weights"]["seconds"] >= 0, outcome["reason"]
    if outcome["status"] == Status.NOT_RUN:  # this vLLM build lacks the kernel: named, after config and weights
        assert kernel in outcome["reason"] and outcome["reply"]["status"] == Status.NOT_RUN
    else:
        assert outcome["status"] == Status.OK, outcome["reason"]
        (case,) = outcome["cases"]
        assert case["text"].strip() == case["expected"].strip() and case["text"].strip()
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk["consumers"]["vllm"]["status"] == outcome["status"] and on_disk["status"] == "ok"


# mixtures of experts with sizes vLLM's 4-bit CPU kernels take (multiples of 128)
MOE_SIZES = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 initializer_range=0.05)  # fmt: skip


@pytest.mark.consumers
@needs_vllm
@pytest.mark.parametrize(("model", "sizes", "served", "words"), [
    ("qwen3_moe", {**MOE_SIZES, "moe_intermediate_size": 256}, Status.OK, None),
    ("gpt_oss", MOE_SIZES, Status.NOT_RUN, "lacks a 4-bit kernel for experts with biases"),
    ("llama4_text", {**MOE_SIZES, "intermediate_size_mlp": 512}, Status.NOT_RUN,
     "lacks a 4-bit CPU kernel for experts that take the router's weight on their input"),
    ("qwen3_5", None, Status.NOT_RUN, "lacks torchvision"),  # the released, multimodal form
])  # fmt: skip
def test_vllm_serves_mixture_of_experts_gptq_where_its_build_has_the_expert_kernel(smollm2_dir, tmp_path, model,
                                                                                   sizes, served, words):  # fmt: skip
    """Our per-expert GPTQ checkpoints as vLLM's loaders read them: a recipe run's SERVE step starts vLLM on the
    artifact. Qwen3 MoE: config, weights and reply ok (the reply equals ours). What vLLM's CPU build or our
    virtualenv lacks is not_run naming it, and the target stays ok: gpt-oss's experts (biases, clamped SwiGLU) and
    Llama 4's (the router's weight on their input) have no 4-bit CPU kernel, though Llama 4's weights load;
    multimodal Qwen 3.5 needs torchvision."""
    import yaml

    from pipeline.convert import run_recipe
    from pipeline.recipe import load_recipe
    from tests.conftest import GGUF_CONFIGS, make_tiny_model

    base = GGUF_CONFIGS if sizes is None else None
    folder = make_tiny_model(tmp_path / "checkpoint", model, smollm2_dir, base=base, **(sizes or {}))
    path = write_recipe(tmp_path, folder, [("gptq", "int4")], budgets={"gptq/int4": BUDGET})
    data = yaml.safe_load(path.read_text())
    data["calibration"] = {"samples": 8, "seq_len": 128}
    data["targets"][0]["options"] = {"group_size": 128}
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    summary = run_recipe(recipe)
    manifest = json.loads((recipe.output_dir() / "gptq-int4" / "manifest.json").read_text())
    print(f"{model}: {consumers.summary(manifest['serve'])}")
    assert summary["ok"] and manifest["status"] == "ok", summary
    assert manifest["serve"]["status"] == served
    if served == Status.OK:
        (case,) = manifest["serve"]["cases"]
        assert case["text"].strip() == case["expected"].strip() and case["text"].strip()
    else:
        assert words in manifest["serve"]["reason"]


@pytest.fixture(scope="module")
def smollm2_w8a8(smollm2_dir, tmp_path_factory):
    """The bundled SmolLM2-135M as compressed-tensors W8A8, published by a recipe run (about 2 minutes)."""
    from pipeline.convert import run_recipe
    from pipeline.recipe import load_recipe

    folder = tmp_path_factory.mktemp("consumers-smollm2")
    recipe = load_recipe(write_recipe(folder, smollm2_dir, [("compressed", "w8a8")],
                                      budgets={"compressed/w8a8": {"max_ppl_ratio": 1.1}}))  # fmt: skip
    summary = run_recipe(recipe)
    assert summary["ok"], summary
    return recipe.output_dir() / "compressed-w8a8"


@pytest.mark.consumers
@needs_vllm
@pytest.mark.parametrize(("change", "stage", "named"), [
    ({"desc_act": True}, "config", "desc_act"),  # act-order groups: refused by vLLM's config verification
    ({"bits": 3}, "config", "bits=3"),
    ({"group_size": 64}, "weights", "exceeds dimension size"),  # a config that does not fit the tensors
])  # fmt: skip
def test_vllm_itself_refuses_what_its_gptq_loader_does_not_take(published, tmp_path, change, stage, named):
    """The artifact's config edited into one vLLM refuses: its own config verification fails the check before any
    weight is read, or its weight loader fails it on tensors the config does not describe."""
    folder = shutil.copytree(published / "gptq-int4", tmp_path / "gptq-int4")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    outcome = consumers.vllm_check(folder, tmp_path / "vllm.log")
    print(f"{change}: {consumers.summary(outcome)}")
    assert outcome["status"] == Status.FAILED and outcome[stage]["status"] == Status.FAILED, outcome
    assert outcome["config"]["status"] == (Status.FAILED if stage == "config" else Status.OK)
    assert outcome["weights"]["status"] == (Status.NOT_RUN if stage == "config" else Status.FAILED)
    assert outcome["reply"]["status"] == Status.NOT_RUN and named in outcome["reason"], outcome["reason"]


@pytest.mark.consumers
@needs_xinference
def test_xinference_registers_launches_and_answers_with_the_gptq_artifact(published, tmp_path):
    """Xinference's own server takes our `xinference.json` (its CustomLLMFamilyV2 parse), launches the GPTQ int4
    artifact from `model_uri` with its transformers engine, and answers the first smoke prompt greedily as ours."""
    folder = published / "gptq-int4"
    outcome = xinference.xinference_check(folder, tmp_path / "xinference.log")
    consumers.record(folder, "xinference", outcome)
    print(f"gptq-int4: {consumers.summary(outcome)}")
    assert outcome["registration"]["status"] == Status.OK and outcome["launch"]["status"] == Status.OK, outcome
    assert outcome["status"] == Status.OK and outcome["reply"]["status"] == Status.OK, outcome["reason"]
    (case,) = outcome["cases"]
    assert case["text"].strip() == case["expected"].strip() and case["text"].strip()


@pytest.mark.consumers
@needs_xinference
def test_xinference_refuses_a_registration_it_cannot_parse(published, tmp_path):
    """A float `model_size_in_billions` (Xinference takes an int or "0_135"): its own parse refuses the registration
    and the check fails there, before any launch."""
    folder = shutil.copytree(published / "gptq-int4", tmp_path / "gptq-int4")
    family = json.loads((folder / "xinference.json").read_text())
    family["model_specs"][0]["model_size_in_billions"] = 0.026
    (folder / "xinference.json").write_text(json.dumps(family))
    outcome = xinference.xinference_check(folder, tmp_path / "xinference.log")
    assert outcome["status"] == Status.FAILED and outcome["registration"]["status"] == Status.FAILED, outcome
    assert outcome["launch"]["status"] == Status.NOT_RUN and "registration: HTTP" in outcome["reason"]


def manifest_folder(tmp_path, script: str | None = "#!/bin/sh\nexit 1\n"):
    manifest = Manifest(model="tiny", target="gptq/int4", format="gptq", quant="int4", status=Status.OK)
    (tmp_path / "manifest.json").write_text(manifest.model_dump_json())
    if script:
        (tmp_path / "vllm-serve.sh").write_text(script)
    return tmp_path


def test_without_vllms_virtualenv_the_check_is_not_run_naming_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv(consumers.VLLM_PYTHON, str(tmp_path / "absent" / "python"))
    outcome = consumers.vllm_check(manifest_folder(tmp_path), tmp_path / "log")
    assert outcome["status"] == Status.NOT_RUN and "make vllm-venv" in outcome["reason"]
    manifest = consumers.record(tmp_path, "vllm", outcome)
    assert manifest.consumers["vllm"]["status"] == Status.NOT_RUN and manifest.status == Status.OK


def test_without_xinferences_virtualenv_the_check_is_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv(xinference.XINFERENCE_PYTHON, str(tmp_path / "absent" / "python"))
    outcome = xinference.xinference_check(manifest_folder(tmp_path, None), tmp_path / "log")
    assert outcome["status"] == Status.NOT_RUN and "make xinference-venv" in outcome["reason"]


LOG_HEAD = "INFO Initializing a V1 LLM engine (v0.32.0) with config: model='.', quantization=gptq\n"
WEIGHTS = "INFO Loading weights took 0.12 seconds\n"


@pytest.mark.parametrize(("log", "status", "stage", "words"), [
    ("ValueError: Currently, only 4-bit weight quantization is supported for GPTQ, but got 3 bits.\n", "failed",
     "config", "vLLM refused the config: ValueError: Currently, only 4-bit"),
    (LOG_HEAD + "KeyError: 'model.layers.0.mlp.gate_proj.qzeros'\n", "failed", "weights",
     "weight loading failed: KeyError"),
    (LOG_HEAD + WEIGHTS + "RuntimeError: _C::cpu_gemm_wna16() is not implemented for this build\n", "not_run",
     "reply", "lacks the cpu_gemm_wna16 kernel"),
    (LOG_HEAD + WEIGHTS + "RuntimeError: out of memory\n", "failed", "reply", "vLLM's server: RuntimeError"),
    # gpt-oss's GPTQ experts on vLLM 0.32's CPU build (measured): its 4-bit MoE kernel takes SiLU experts, no biases
    (LOG_HEAD + "NotImplementedError: No WNA16 MoE backend supports the deployment configuration.\n", "not_run",
     "weights", "lacks a 4-bit kernel for experts with biases"),
    # words of MISSING in a warning, not an error: what failed is still the weight loading
    (LOG_HEAD + "WARNING [utils.py:1] optional import: No module named 'torchvision'\n"
     "KeyError: 'model.layers.0.mlp.gate_proj.qzeros'\n", "failed", "weights", "weight loading failed: KeyError"),
])  # fmt: skip
def test_vllms_log_decides_each_stage(tmp_path, log, status, stage, words):
    """A server that stopped: the first stage vLLM did not report passing fails with vLLM's own error; a missing
    kernel after config and weights is not_run, naming the kernel."""
    (tmp_path / "vllm.log").write_text(log)
    outcome = {**consumers.stages(tmp_path / "vllm.log"), **consumers.stopped(tmp_path / "vllm.log", "exited")}
    assert outcome["status"] == status and words in outcome["reason"]
    assert outcome[stage]["status"] == status
    later = {"config": ["weights", "reply"], "weights": ["reply"], "reply": []}[stage]
    assert all(outcome[s]["status"] == Status.NOT_RUN for s in later)


@pytest.mark.parametrize(("fmt_name", "quant"), [("gptq", "int4"), ("compressed", "w8a8")])
def test_vllm_is_the_serve_step_of_its_formats_and_not_run_without_its_virtualenv(monkeypatch, tmp_path, fmt_name,
                                                                                   quant):  # fmt: skip
    """GPTQ and compressed-tensors targets end with vLLM's serve check like GGUF's with llama.cpp's server; where the
    vLLM virtualenv is missing the step is not_run naming the make target (the demo's `served` column says so)."""
    from pipeline.convert import cannot_run
    from pipeline.formats.base import Format
    from pipeline.types import Step, Target

    monkeypatch.setenv(consumers.VLLM_PYTHON, str(tmp_path / "no-venv" / "bin" / "python"))
    fmt = Format.for_target(Target(format=fmt_name, quant=quant))
    assert fmt.steps == (Step.BUILD, Step.VALIDATE, Step.SERVE, Step.PUBLISH) and fmt.server_script == "vllm-serve.sh"
    assert "make vllm-venv" in cannot_run(fmt, Step.SERVE)
    assert cannot_run(fmt, Step.VALIDATE) is None
    outcome = fmt.serve(tmp_path, None, None, tmp_path / "log")
    assert outcome["status"] == Status.NOT_RUN and "make vllm-venv" in outcome["reason"]
