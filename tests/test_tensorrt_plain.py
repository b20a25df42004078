"""Plain TensorRT from the standard ONNX export, as far as it can be checked without a GPU or TensorRT: the
optimization profiles against a real fp16 export and the shapes our decode loop really feeds, the decode loop over a
session that is not onnxruntime's (TensorRTSession's contract), the engine route choice, the option errors, and
every TensorRT call against TensorRT's own published type stubs."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil

import pytest
import torch
from pydantic import ValidationError

from pipeline.formats import tensorrt as trt_format
from pipeline.formats import tensorrt_engine, tensorrt_plain
from pipeline.recipe import RecipeTarget as Target
from pipeline.runtimes import tensorrt as trt_runtime
from pipeline.runtimes.tensorrt import DECODE, PREFILL, TensorInfo
from pipeline.runtimes.tensorrt_llm import refuse_foreign_engine
from pipeline.source import inspect_checkpoint, load_tokenizer
from pipeline.types import FormatError

ort = pytest.importorskip("onnxruntime", reason="ONNX is an optional extra: pip install 'weightsmith[onnx]'")
from pipeline.runtimes.onnxruntime import OnnxRuntime  # noqa: E402
from tests.conftest import build_artifact  # noqa: E402

TEXT = "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do."


@pytest.fixture(scope="module")
def fp16_export(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-fp16")
    _, source, facts = build_artifact(tiny_model("qwen2"), ("onnx", "fp16", {"flavour": "standard"}), out)
    return out, facts, source


class RecordingSession:
    """onnxruntime's session shown the way TensorRTSession shows an engine (-1 for a dynamic axis), recording the
    feeds of every call."""

    def __init__(self, folder):
        self.inner = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.calls: list[dict] = []

    @staticmethod
    def _info(args) -> list[TensorInfo]:
        return [TensorInfo(a.name, [d if isinstance(d, int) else -1 for d in a.shape], a.type) for a in args]

    def get_inputs(self):
        return self._info(self.inner.get_inputs())

    def get_outputs(self):
        return self._info(self.inner.get_outputs())

    def run(self, names, feeds):
        self.calls.append(feeds)
        return self.inner.run(names, feeds)


def test_profiles_cover_every_call_of_the_decode_loop(fp16_export):
    folder, facts, source = fp16_export
    options = trt_format.Options(max_batch_size=2, max_input_len=64, max_seq_len=96)
    inputs = tensorrt_plain.graph_inputs(folder / "model.onnx")
    shapes = tensorrt_plain.profiles(inputs, options)
    assert set(shapes[PREFILL]) == set(shapes[DECODE]) == set(inputs) == set(facts["inputs"])
    past = "past_key_values.0.key"
    for profile in shapes:  # every corner consistent: total = past + new tokens, the cache's fixed axes kept
        for k in range(3):
            assert profile["attention_mask"][k][1] == profile[past][k][2] + profile["input_ids"][k][1]
            assert profile["position_ids"][k] == profile["input_ids"][k]
            assert profile[past][k][1::2] == (facts["kv_heads"], facts["head_dim"])
        assert profile["input_ids"][0][0] == 1 and profile["input_ids"][2][0] == 2
    assert shapes[PREFILL]["input_ids"][2] == (2, 64) and shapes[PREFILL][past][2][2] == 0
    assert shapes[DECODE][past][2][2] == 95 and shapes[DECODE]["attention_mask"][2] == (2, 96)

    session = RecordingSession(folder)
    runtime = OnnxRuntime(folder, session=session, description={"runtime": "recording"})
    ids = load_tokenizer(source.path)(TEXT).input_ids
    runtime.logits(ids)
    runtime.greedy(ids, 8, stop_ids=set())
    used = [trt_runtime.profile_for(feeds) for feeds in session.calls]
    assert used.count(PREFILL) == 2 and used.count(DECODE) == 7
    for feeds, index in zip(session.calls, used):
        for name, array in feeds.items():
            low, _, high = shapes[index][name]
            assert all(lo <= n <= hi for lo, n, hi in zip(low, array.shape, high)), (name, array.shape, index)


def test_decode_loop_runs_over_a_session_that_is_not_onnxruntimes(fp16_export):
    folder, _, source = fp16_export
    ids = load_tokenizer(source.path)(TEXT).input_ids
    own = OnnxRuntime(folder)
    foreign = OnnxRuntime(folder, session=RecordingSession(folder), description={"runtime": "x"})
    assert foreign.dtype == own.dtype and foreign.empty_past == own.empty_past == (1, 2, 0, 16)
    assert (foreign.logits(ids) == own.logits(ids)).all()
    assert foreign.greedy(ids, 6, set()) == own.greedy(ids, 6, set())
    assert foreign.description == {"runtime": "x"}


def test_profile_choice_and_unknown_axes():
    import numpy as np

    past = np.zeros((1, 2, 5, 16), np.float16)
    assert trt_runtime.profile_for({"input_ids": np.zeros((1, 7)), "past_key_values.0.key": past[:, :, :0]}) == 0
    assert trt_runtime.profile_for({"input_ids": np.zeros((1, 1)), "past_key_values.0.key": past}) == DECODE
    with pytest.raises(ValueError, match="3 new tokens after 5 cached ones"):
        trt_runtime.profile_for({"input_ids": np.zeros((1, 3)), "past_key_values.0.key": past})
    with pytest.raises(ValueError, match="axis 'past_seq_len'"):
        tensorrt_plain.profiles({"past_key_values.0.key": ["batch", 2, "past_seq_len", 16]}, trt_format.Options())


Opt = trt_format.Options
BOTH = {"tensorrt_llm": "1.2.1", "tensorrt": "10.13.3.9"}
PLAIN, NONE = {"tensorrt_llm": None, "tensorrt": "10.13.3.9"}, {}


@pytest.mark.parametrize(
    "options, quant, versions, expected",
    [
        (Opt(), "fp16", BOTH, "tensorrt_llm"),
        (Opt(onnx_target="onnx/fp16"), "fp16", BOTH, "tensorrt_llm"),  # auto prefers TensorRT-LLM
        (Opt(onnx_target="onnx/fp16"), "fp16", PLAIN, "onnx"),
        (Opt(onnx_target="onnx/fp16", engine_route="onnx"), "fp16", BOTH, "onnx"),
        (Opt(onnx_target="onnx/fp16", engine_route="tensorrt_llm"), "fp16", PLAIN, "tensorrt_llm_not_installed"),
        (Opt(), "fp16", PLAIN, "tensorrt_llm_not_installed"),
        (Opt(), "w4a16_gptq", PLAIN, "tensorrt_llm_not_installed"),
        (Opt(onnx_target="onnx/fp16"), "fp16", NONE, "tensorrt_not_installed"),
        (Opt(onnx_target="onnx/fp16"), "fp16", {"tensorrt": "11.4.0.106"}, "tensorrt_version_mismatch"),
        (Opt(onnx_target="onnx/fp16", tensorrt="11"), "fp16", {"tensorrt": "11.4.0.106"}, "onnx"),
        (Opt(), "fp16", {"tensorrt_llm": "1.4.0"}, "tensorrt_llm_version_mismatch"),
    ],
)  # fmt: skip
def test_engine_route(options, quant, versions, expected):
    chosen = tensorrt_engine.route(options, quant, versions)
    assert (chosen if isinstance(chosen, str) else chosen[0]) == expected
    if expected == "tensorrt_llm_not_installed":  # the fp16 message points at the plain route, others do not
        assert ("onnx_target" in chosen[1]) == (quant == "fp16" and not options.onnx_target)
        assert ("engine_route auto" in chosen[1]) == bool(options.onnx_target)
    if expected == "tensorrt_not_installed":
        assert "pypi.nvidia.com" in chosen[1]


def test_option_errors():
    with pytest.raises(ValidationError, match="plain TensorRT builds fp16 engines .* drop onnx_target for w4a16"):
        Target(format="tensorrt", quant="w4a16", options={"onnx_target": "onnx/fp16"})
    with pytest.raises(ValidationError, match="engine_route onnx needs onnx_target"):
        Target(format="tensorrt", quant="fp16", options={"engine_route": "onnx"})


def test_onnx_artifact_must_be_the_passed_fp16_standard_export(tmp_path):
    def artifact(name, flavour, precision):
        (tmp_path / name).mkdir()
        manifest = {"status": "ok", "build": {"flavour": flavour, "precision": precision}}
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        return tmp_path / name

    fp16, fp32 = artifact("onnx-fp16", "standard", "fp16"), artifact("onnx-fp32", "standard", "fp32")
    assert trt_format.onnx_artifact(fp16, "onnx/fp16") == fp16
    with pytest.raises(FormatError, match="onnx/fp32 is a standard fp32 ONNX export; plain TensorRT needs the st"):
        trt_format.onnx_artifact(fp32, "onnx/fp32")
    with pytest.raises(ValidationError, match="'gptq/int4' is not a onnx target"):
        Target(format="tensorrt", quant="fp16", options={"onnx_target": "gptq/int4"})


def test_plain_route_target_without_cuda(tiny_llama, tmp_path):
    import yaml

    from pipeline.convert import run_recipe
    from pipeline.plan import make_plan
    from pipeline.recipe import load_recipe
    from tests.conftest import write_recipe

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the engine steps would run")
    budgets = {"tensorrt/fp16": {"max_ppl_ratio": 1.01}, "onnx/fp16": {"max_ppl_ratio": 1.01}}
    path = write_recipe(tmp_path, tiny_llama, [("onnx", "fp16"), ("tensorrt", "fp16")], budgets=budgets)
    data = yaml.safe_load(path.read_text())
    data["targets"][0]["options"] = {"flavour": "standard"}
    data["targets"][1]["options"] = {"onnx_target": "onnx/fp16"}
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    summary = run_recipe(recipe)
    assert summary["ok"], summary
    onnx_manifest = json.loads((recipe.output_dir() / "onnx-fp16" / "manifest.json").read_text())
    assert onnx_manifest["status"] == "ok" and onnx_manifest["build"]["precision"] == "fp16"
    folder = recipe.output_dir() / "tensorrt-fp16"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "not_run" and "no_cuda_device" in manifest["reason"]
    assert not (folder / "engine").exists()
    # the engine is made from the ONNX artifact: the target is redone when that one is
    other = recipe.targets[0].model_copy(update={"options": {"flavour": "standard", "execution_provider": "cuda"}})
    changed = recipe.model_copy(update={"targets": [other, recipe.targets[1]]})
    source = inspect_checkpoint(tiny_llama)
    assert make_plan(recipe).inputs(source, "tensorrt/fp16") != make_plan(changed).inputs(source, "tensorrt/fp16")


STUBS = "10.13.0.35.1"  # tensorrt-stubs: TensorRT 10.13's Python API, published on PyPI (installed with --no-deps)


def test_tensorrt_calls_match_tensorrts_own_stubs(tmp_path, monkeypatch):
    """Every TensorRT call of the plain route (names, arguments, types) against TensorRT's published stubs: the
    check that can run without TensorRT. The stubs need two fixes to parse (a parameter named `in`, a required
    parameter after defaults); their own other complaints are not ours and are filtered out."""
    mypy = pytest.importorskip("mypy.api", reason="mypy comes with the dev extra")
    try:
        installed = importlib.metadata.version("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"pip install --no-deps tensorrt-stubs=={STUBS} (make install does)")
    assert installed == STUBS
    site = importlib.metadata.distribution("tensorrt-stubs").locate_file("")
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / package, tmp_path / "stubs" / package)
    bindings = tmp_path / "stubs" / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"([(, ])in: ", r"\1in_: ", bindings.read_text())
    bindings.write_text(text.replace("channel_axis: int)", "channel_axis: int = ...)"))
    monkeypatch.setenv("MYPYPATH", str(tmp_path / "stubs"))

    def errors(path) -> list[str]:
        out, _, _ = mypy.run([str(path), "--follow-imports=skip", "--ignore-missing-imports",
                              "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
        return [line for line in out.splitlines() if line.startswith(str(path)) and ": error:" in line]

    wrong = tmp_path / "wrong.py"
    wrong.write_text("import tensorrt as trt\n\n\ndef f(c: trt.IExecutionContext) -> None:\n"
                     "    c.execute_async_v4(0)\n    c.set_optimization_profile_async(1)\n")  # fmt: skip
    assert len(errors(wrong)) == 2  # the check does see a call TensorRT does not have
    assert errors(tensorrt_plain.__file__) == [] and errors(trt_runtime.__file__) == []


@pytest.mark.parametrize("route", ["tensorrt_llm", "onnx"])
def test_an_engine_from_another_gpu_or_version_is_refused_naming_both(tmp_path, route):
    built = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.13.3.9",
             "tensorrt_llm": "1.2.1" if route == "tensorrt_llm" else None, "driver": "580.65"}  # fmt: skip
    (tmp_path / "engine.json").write_text(json.dumps({"route": route, "environment": built}))
    refuse_foreign_engine(tmp_path, {**built, "driver": "590.1"})  # the driver may differ
    other_gpu = {**built, "gpu": "NVIDIA L4", "compute_capability": "8.9"}
    with pytest.raises(RuntimeError, match="built for gpu NVIDIA H100 80GB HBM3, this worker has NVIDIA L4"):
        refuse_foreign_engine(tmp_path, other_gpu)
    with pytest.raises(RuntimeError, match="built for tensorrt 10.13.3.9, this worker has 10.14.1"):
        refuse_foreign_engine(tmp_path, {**built, "tensorrt": "10.14.1"})
    newer_llm = {**built, "tensorrt_llm": "1.2.2"}
    if route == "tensorrt_llm":
        with pytest.raises(RuntimeError, match="built for tensorrt_llm 1.2.1, this worker has 1.2.2"):
            refuse_foreign_engine(tmp_path, newer_llm)
    else:  # a plain TensorRT engine does not care about TensorRT-LLM
        refuse_foreign_engine(tmp_path, newer_llm)
