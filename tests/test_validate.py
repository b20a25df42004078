"""Validation: the quality figures are computed right, budgets decide pass or fail, and a failure reaches the user."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.convert import run_recipe
from pipeline.corpus import CORPUS_FILE, load_text, split_corpus
from pipeline.recipe import load_recipe
from pipeline.reference import PromptCase, Reference, eval_chunks, score
from pipeline.source import load_tokenizer
from pipeline.types import Budget
from pipeline.validate import compare, generate, judge
from tests.conftest import REPO, write_recipe


class FixedRuntime:
    """A runtime whose logits are given: lets the metrics be checked against hand computations."""

    description = {"runtime": "fixed"}

    def __init__(self, logits):
        self._logits = iter(logits)

    def logits(self, ids):
        return next(self._logits)

    def greedy(self, ids, max_new_tokens, stop_ids):
        return [5, 6, 9, 9][:max_new_tokens]


def make_reference(rng, n_chunks=3, length=40, vocab=50):
    chunks = [rng.integers(0, vocab, length).tolist() for _ in range(n_chunks)]
    logits = [rng.normal(size=(length, vocab)).astype(np.float32) * 3 for _ in chunks]
    scores = [score(torch.log_softmax(torch.from_numpy(x[:-1]), -1).numpy(), c) for x, c in zip(logits, chunks)]
    return Reference(chunks=chunks, scores=scores, prompts=[], probe_text="", probe_ids=[], stop_ids={9}), logits


def test_identical_logits_give_ratio_one_and_zero_kl():
    ref, logits = make_reference(np.random.default_rng(0))
    quality = compare(ref, FixedRuntime(logits))
    assert quality["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert quality["top1_agreement"] == 1.0 and quality["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert quality["n_tokens"] == 3 * 39


def test_metrics_match_torch_on_perturbed_logits():
    rng = np.random.default_rng(1)
    ref, logits = make_reference(rng)
    noisy = [x + rng.normal(size=x.shape).astype(np.float32) for x in logits]
    quality = compare(ref, FixedRuntime(noisy))

    targets = torch.tensor([t for c in ref.chunks for t in c[1:]])
    ours = torch.from_numpy(np.concatenate([x[:-1] for x in noisy]))
    theirs = torch.from_numpy(np.concatenate([x[:-1] for x in logits]))
    ppl = math.exp(torch.nn.functional.cross_entropy(ours, targets).item())
    ppl_source = math.exp(torch.nn.functional.cross_entropy(theirs, targets).item())
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1), log_target=True, reduction="none"
    ).sum(-1)
    assert quality["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert quality["ppl_source"] == pytest.approx(ppl_source, rel=1e-5)
    assert quality["ppl_ratio"] == pytest.approx(ppl / ppl_source, rel=1e-5)
    assert quality["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert quality["kl_p99"] == pytest.approx(np.percentile(kl.numpy(), 99), rel=1e-4)
    assert quality["top1_agreement"] == pytest.approx((ours.argmax(-1) == theirs.argmax(-1)).float().mean().item())


def test_generation_counts_the_matching_prefix(smollm2_dir):
    ref, _ = make_reference(np.random.default_rng(2))
    ref.tokenizer = load_tokenizer(smollm2_dir)
    ref.prompts = [PromptCase("p", "p", [1, 2], expected=[5, 6, 7, 9])]
    result = generate(ref, FixedRuntime([]), max_new_tokens=4)
    assert result["cases"][0]["matching_prefix"] == 2 and result["cases"][0]["tokens"] == 4


def test_tokenizer_difference_fails_unless_the_budget_accepts_it():
    quality = {"ppl_ratio": 1.0, "top1_agreement": 1.0, "kl_mean": 0.0}
    same, different = {"matches": True, "first_mismatch": None}, {"matches": False, "first_mismatch": 7}
    assert judge(quality, None, same) == [] and judge(quality, Budget(), None) == []
    assert judge(quality, Budget(max_ppl_ratio=1.1), different) == [
        "tokenizer differs from the source's at token 7 (a budget with exact_tokenizer: false accepts it)"
    ]
    assert judge(quality, Budget(exact_tokenizer=False), different) == []


def test_budget_judgement():
    quality = {"ppl_ratio": 1.02, "top1_agreement": 0.95, "kl_mean": 0.01}
    assert judge(quality, None) == []
    assert judge(quality, Budget(max_ppl_ratio=1.05, min_top1=0.9, max_kl_mean=0.02)) == []
    assert judge(quality, Budget(max_ppl_ratio=1.01, min_top1=0.99, max_kl_mean=0.001)) == [
        "perplexity ratio 1.0200 > budget 1.01",
        "top-1 agreement 0.9500 < budget 0.99",
        "mean KL 0.01000 > budget 0.001",
    ]


def test_corpus_split_never_overlaps():
    text = CORPUS_FILE.read_text()
    calibration, held_out = split_corpus(text)
    assert load_text("builtin:corpus", "calibration") == calibration
    assert 0.15 < len(held_out) / len(text) < 0.25
    body = calibration.rstrip("\n")
    assert text.startswith(body) and text.endswith(held_out) and held_out.strip()
    assert text.rindex(held_out) >= len(body)  # held-out text starts after the calibration text ends


def test_eval_chunks_start_with_bos_only_when_the_tokenizer_adds_it(smollm2_dir, spm_tokenizer_dir):
    text = load_text("builtin:corpus", "held_out")
    smollm = eval_chunks(load_tokenizer(smollm2_dir), text, 300, 100)
    assert len(smollm) == 3 and all(len(c) == 100 for c in smollm) and smollm[0][0] != 1
    spm = eval_chunks(load_tokenizer(spm_tokenizer_dir), text, 300, 100)
    assert all(c[0] == 1 and len(c) == 100 for c in spm)
    assert spm[1][1:] != spm[0][1:]
    with pytest.raises(ValueError, match="held-out text has"):
        eval_chunks(load_tokenizer(smollm2_dir), "short text", 300, 100)


def test_budget_violation_fails_the_target_and_keeps_the_numbers(tiny_llama, tmp_path):
    recipe = load_recipe(
        write_recipe(
            tmp_path,
            tiny_llama,
            [("gguf", "f32"), ("gguf", "q4_0")],
            budgets={"gguf/q4_0": {"max_ppl_ratio": 1.0001, "min_top1": 0.999}},
        )
    )
    summary = run_recipe(recipe)
    rows = {r["target"]: r for r in summary["targets"]}
    assert summary["ok"] is False
    assert rows["gguf/f32"]["status"] == "ok"
    assert rows["gguf/q4_0"]["status"] == "failed" and "perplexity ratio" in rows["gguf/q4_0"]["reason"]
    manifest = json.loads((recipe.output_dir() / "gguf-q4_0" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["quality"]["ppl_ratio"] > 1.0001
    assert manifest["smoke"]["tokenizer"]["matches"] and manifest["smoke"]["generation"]["cases"][0]["tokens"] > 0
    assert [p.name for p in (recipe.output_dir() / "gguf-q4_0").iterdir()] == ["manifest.json"]  # never published
    assert manifest["files"] == [] and manifest["steps"] == {"build": "built", "validate": "failed"}
    f32 = json.loads((recipe.output_dir() / "gguf-f32" / "manifest.json").read_text())
    assert f32["quality"]["ppl_ratio"] == pytest.approx(1.0, abs=2e-3) and f32["quality"]["top1_agreement"] > 0.97
    assert json.loads((recipe.output_dir() / "summary.json").read_text())["ok"] is False


def test_cli_exit_status_follows_the_outcome(tiny_llama, tmp_path):
    failing = write_recipe(
        tmp_path, tiny_llama, [("gguf", "q4_0")], budgets={"gguf/q4_0": {"max_ppl_ratio": 1.0000001}}
    )
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "convert", str(failing), "--no-prefect"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 1, run.stderr
    assert "gguf/q4_0" in run.stdout and "failed" in run.stdout and "perplexity ratio" in run.stdout

    passing = write_recipe(tmp_path, tiny_llama, [("gguf", "f16")], budgets={"gguf/f16": {"max_ppl_ratio": 1.01}})
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "convert", str(passing), "--no-prefect"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    assert "gguf/f16" in run.stdout and " ok " in run.stdout


def test_missing_runtime_is_reported_not_run_with_the_extra(tiny_llama, tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("gguf", "f16")]))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    summary = run_recipe(recipe)
    (row,) = summary["targets"]
    assert row["status"] == "not_run"
    assert row["reason"] == "validate: llama-cpp-python is not installed: pip install 'weightsmith[gguf]'"
    assert summary["ok"] is True  # not run is not a failure, and says so
    manifest = json.loads((recipe.output_dir() / "gguf-f16" / "manifest.json").read_text())
    assert manifest["status"] == "not_run" and manifest["quality"] is None
    assert manifest["files"] == []  # built, but not validated: not published


def test_step_needing_absent_hardware_is_not_run(tiny_llama, tmp_path, monkeypatch):
    from pipeline.formats.gguf import GGUF
    from pipeline.types import Step

    monkeypatch.setattr(GGUF, "hardware", {Step.BUILD: ("cuda",), Step.VALIDATE: ("cuda",)})
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("gguf", "f16")]))
    (row,) = run_recipe(recipe)["targets"]
    assert row["status"] == "not_run" and row["reason"].startswith("build: no_cuda_device: build needs cuda")
    folder = recipe.output_dir() / "gguf-f16"
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]  # no artifact file, only the reason


def test_a_figure_that_is_not_a_number_fails_whatever_the_budget():
    nan = {"ppl": math.nan, "ppl_source": 20.0, "ppl_ratio": math.nan, "top1_agreement": 0.5, "kl_mean": math.inf}
    for budget in (None, Budget(), Budget(max_ppl_ratio=1.5, min_top1=0.1, max_kl_mean=10.0)):
        failures = judge(nan, budget)
        assert [f.split(" is ")[0] for f in failures] == ["ppl", "ppl_ratio", "kl_mean"], failures


def test_json_with_nan_is_refused_naming_where(tmp_path):
    from pipeline.files import write_json

    with pytest.raises(ValueError, match=r"summary.json: targets.0.ppl is not a finite number"):
        write_json(tmp_path / "summary.json", {"targets": [{"ppl": math.nan}]})
    assert not (tmp_path / "summary.json").exists() and list(tmp_path.iterdir()) == []


def test_nan_logits_fail_the_target(tmp_path):
    ref, logits = make_reference(np.random.default_rng(3))
    broken = [np.full_like(x, np.nan) for x in logits]
    quality = compare(ref, FixedRuntime(broken))
    assert math.isnan(quality["ppl"]) and judge(quality, Budget(max_ppl_ratio=2.0))
