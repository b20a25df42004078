"""Consumer checks: a real serving stack, in its own virtualenv, loads and serves a published artifact.

vLLM pins its own torch and transformers, so it lives in its own virtualenv (`make vllm-venv`: `.venv-vllm` beside
the project, or the interpreter named by WEIGHTSMITH_VLLM_PYTHON) and runs as a separate process: the artifact's own
`vllm-serve.sh`, run as written from its folder with that interpreter as "$PYTHON" (`pipeline.serve.running`). What
vLLM itself logs decides each stage, reported separately:

- config: vLLM verified the checkpoint's config and quantization config (its engine logs the config it built);
- weights: vLLM's model loader read every tensor into its layers ("Loading weights took ...");
- reply: the server answered the first smoke prompt greedily as our runtime did (`pipeline.serve.judge_reply`).

A refused config or a failed weight load fails the check. What the installed vLLM build lacks (the AVX2 CPU build
has no `cpu_gemm_wna16` and no `int8_scaled_mm`; the CPU builds have no 4-bit kernel for gpt-oss's or Llama 4's
experts; our virtualenv has no torchvision for the multimodal models) makes it `not_run`, naming it (`MISSING`).
No vLLM virtualenv: `not_run`, naming `make vllm-venv`. The outcome has the serve check's keys ({"status",
"server", "cases", "reason"}) plus "config", "weights" and the timings, and is recorded in the artifact's manifest
under `consumers` (`record`).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import read_manifest, write_manifest
from pipeline.handoff import chat_info
from pipeline.serve import chat, judge_reply, running
from pipeline.types import Manifest, Status

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = "WEIGHTSMITH_VLLM_PYTHON"
# start-up measured 44-126 s on 2 idle cores, 4-6 min on a loaded machine
VLLM_START_TIMEOUT = float(os.environ.get("WEIGHTSMITH_VLLM_START_TIMEOUT", "900"))
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": None, "VIRTUAL_ENV": None}  # 1 GiB of KV cache: small hosts
# vLLM's log lines that mark a stage as passed (vllm/v1/engine/core.py, model_loader/default_loader.py)
CONFIG_DONE = re.compile(r"Initializing a V1 LLM engine \(v([^)]+)\) with config")
WEIGHTS_DONE = re.compile(r"Loading weights took ([\d.]+) seconds")
# what a vLLM build or its virtualenv may lack, by the words of an error vLLM logs -> what that is: the check is
# not_run, naming it, at the stage where it stopped (measured on vLLM 0.32's CPU builds; Qwen3 MoE's SiLU experts
# served)
MISSING = {
    "cpu_gemm_wna16": "the cpu_gemm_wna16 kernel (4-bit weight-only matmuls: GPTQ, compressed-tensors W4A16), which "
    "vLLM's AVX2 CPU build lacks",
    "int8_scaled_mm": "the int8_scaled_mm kernel (INT8 W8A8 matmuls), which vLLM's AVX2 CPU build lacks",
    "No WNA16 MoE backend supports the deployment configuration": "a 4-bit kernel for experts with biases or another "
    "activation than SiLU (gpt-oss's): its CPU MoE kernel takes neither, its GPU kernels do",
    "does not support apply_router_weight_on_input": "a 4-bit CPU kernel for experts that take the router's weight on "
    "their input (Llama 4's): its GPU kernels take them",
    "No module named 'torchvision'": "torchvision, which vLLM's multimodal models import (`make vllm-venv` removes it: "
    "its wheels do not load against the CPU torch)",
}
# a traceback's last line, as a process prints it or vLLM logs it; not a warning that quotes one
ERROR = re.compile(r"^(?:\(\S+ pid=\d+\) )?(?:ERROR \S+ \S+ \[[^\]]*\] )?([\w.]*(?:Error|Exception)): (.+)")
DTYPE = re.compile(r"with config: .*?\bdtype=torch\.(\w+)")
KERNEL_USED = re.compile(r"(?:Using|Selected) (\w+Kernel) for")


def venv_python(variable: str, folder: str) -> Path:
    """A consumer virtualenv's interpreter: the environment variable `variable`, else `folder` in the project's."""
    return Path(os.environ.get(variable) or REPO / folder / "bin" / "python")


def vllm_python() -> Path:
    """The vLLM virtualenv's interpreter: WEIGHTSMITH_VLLM_PYTHON, else `.venv-vllm`."""
    return venv_python(VLLM_PYTHON, ".venv-vllm")


def vllm_missing() -> str | None:
    """Why vLLM cannot be started here (no virtualenv), or None."""
    python = vllm_python()
    if os.access(python, os.X_OK):
        return None
    return f"no vLLM virtualenv at {python}: run `make vllm-venv` or set {VLLM_PYTHON}"


def published(artifact: Path) -> Manifest:
    """The manifest of the artifact a consumer is checked on; FileNotFoundError when it is not one of ours."""
    manifest = read_manifest(artifact)
    if manifest is None:
        raise FileNotFoundError(f"{artifact} has no manifest.json: not a weightsmith artifact")
    return manifest


def vllm_check(artifact: Path, log: Path, max_tokens: int | None = None) -> dict[str, Any]:
    """Serve the published `artifact` with its `vllm-serve.sh` in vLLM's virtualenv; each stage as vLLM reports it."""
    python, script = vllm_python(), artifact / "vllm-serve.sh"
    outcome: dict[str, Any] = {"server": "vLLM's OpenAI server", "script": script.name, "cases": []}
    if why := vllm_missing():
        return {**outcome, "status": Status.NOT_RUN, "reason": why}
    manifest = published(artifact)
    if not script.is_file():
        verdict = manifest.serving.get("vllm")
        why = f"no {script.name}: {verdict.why if verdict else 'the format has no vLLM hand-off'}"
        return {**outcome, "status": Status.NOT_RUN, "reason": why}
    cases = (manifest.smoke or {}).get("generation", {}).get("cases", [])[:1]
    max_tokens = max_tokens or max([c.get("tokens", 0) for c in cases] + [1])  # as many as our runtime generated
    start = time.perf_counter()
    try:
        with running(script, log, VLLM_START_TIMEOUT, python=python, env=VLLM_ENV) as url:
            outcome["startup_s"] = round(time.perf_counter() - start, 1)
            for case in cases:
                reply = chat(url, case["prompt"], max_tokens)
                outcome["cases"].append({"prompt": case["prompt"], "expected": case["text"], **reply})
    except (RuntimeError, OSError, ValueError) as exc:
        return {**outcome, **stages(log), **stopped(log, str(exc))}
    stop_texts = stops(manifest, artifact)
    problems = [problem for case in outcome["cases"] for problem in judge_reply(case, stop_texts, max_tokens)]
    if not cases:
        problems.append("the manifest has no smoke reply to compare with")
    return {**outcome, **stages(log), "reply": {"status": Status.FAILED if problems else Status.OK},
            "status": Status.FAILED if problems else Status.OK, "reason": "; ".join(problems) or None}  # fmt: skip


def stops(manifest: Manifest, artifact: Path) -> list[str]:
    """The stop texts that must not show in a reply (from the source's tokenizer files, where they still are)."""
    try:
        return chat_info(manifest, artifact)["stop"]
    except (OSError, ValueError):
        return []


def stages(log: Path) -> dict[str, Any]:
    """Config and weight loading as vLLM's log reports them: ok where vLLM logged that it passed the stage, failed
    where it did not, not_run for weights that were never reached (the config was refused)."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    config, weights = CONFIG_DONE.search(text), WEIGHTS_DONE.search(text)
    loaded = Status.OK if weights else Status.FAILED if config else Status.NOT_RUN
    found: dict[str, Any] = {"config": {"status": Status.OK if config else Status.FAILED},
                             "weights": {"status": loaded}}  # fmt: skip
    if config:
        found["version"] = config.group(1)
        found["dtype"] = dtype.group(1) if (dtype := DTYPE.search(text)) else None
    if kernels := sorted(set(KERNEL_USED.findall(text))):
        found["kernels"] = kernels  # the linear kernels vLLM chose for the quantized layers
    if weights:
        found["weights"]["seconds"] = float(weights.group(1))
    return found


def stopped(log: Path, message: str) -> dict[str, Any]:
    """The outcome of a server that exited or never answered: the first stage it did not pass fails, with vLLM's
    own error; where vLLM's log shows what this build lacks (`MISSING`), that stage and the later ones are not_run,
    naming it."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    found = stages(log)
    error = first_error(text) or message
    order = ("config", "weights", "reply")
    stage = next(s for s in order if s == "reply" or found[s]["status"] != Status.OK)
    errors = [line for line in text.splitlines() if ERROR.search(line)]  # not warnings that mention the words
    lacking = next((what for words, what in MISSING.items() if any(words in line for line in errors)), None)
    if lacking:
        later = {s: {"status": Status.NOT_RUN} for s in order[order.index(stage) :]}
        return {**later, "status": Status.NOT_RUN, "reason": f"this vLLM build lacks {lacking}: {error}"}
    never = {"reply": {"status": Status.NOT_RUN}, "status": Status.FAILED}
    if stage == "config":
        return {**never, "reason": f"vLLM refused the config: {error}"}
    if stage == "weights":
        return {**never, "reason": f"vLLM's weight loading failed: {error}"}
    return {"reply": {"status": Status.FAILED}, "status": Status.FAILED, "reason": f"vLLM's server: {error}"}


def first_error(text: str) -> str | None:
    """vLLM's own error: the first `SomethingError: message` line of the log (the worker's, before the engine's
    wrapping ones), with the indented lines under it (pydantic's validation errors say what is wrong there), on
    one line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if found := ERROR.search(line):
            detail = [found.group(2).strip()]
            for more in lines[i + 1 : i + 6]:
                if not more[:1].isspace() or "errors.pydantic.dev" in more:
                    break
                detail.append(re.sub(r" \[type=.*", "", more.strip()))
            return f"{found.group(1).rsplit('.', 1)[-1]}: {' '.join(detail)}"[:500]
    return None


def record(artifact: Path, consumer: str, outcome: dict[str, Any]) -> Manifest:
    """The outcome in the artifact's manifest under `consumers`, by consumer name; the artifact's status is kept (the
    check is of a consumer, not of the conversion)."""
    manifest = published(artifact)
    return write_manifest(artifact, manifest.model_copy(update={"consumers": {**manifest.consumers,
                                                                              consumer: outcome}}))  # fmt: skip


def summary(outcome: dict[str, Any]) -> str:
    """One line: each stage's status, the start-up and reply times."""
    stages = ("config", "weights", "registration", "launch", "reply")
    parts = [f"{stage} {outcome[stage]['status']}" for stage in stages if stage in outcome]
    parts += [f"start-up {outcome['startup_s']} s"] if "startup_s" in outcome else []
    parts += [f"first token {case['ttft_s']} s" for case in outcome.get("cases", [])]
    reason = f" ({outcome['reason']})" if outcome.get("reason") else ""
    return f"{outcome['status']} in {outcome['server']}: {', '.join(parts)}{reason}"
