"""Xinference as a consumer: its own server, in its own virtualenv, registers our generated `xinference.json`, launches
the artifact with its transformers engine and answers the first smoke prompt greedily as our runtime did.

`make xinference-venv` (`.venv-xinference`, or WEIGHTSMITH_XINFERENCE_PYTHON) holds Xinference 4.1.0, the CPU torch
and GPTQModel, which its transformers engine loads GPTQ checkpoints with. The server (`xinference-local`) runs on a
free loopback port with a fresh XINFERENCE_HOME and without its account system (XINFERENCE_AUTH_ADVANCED=0: loopback
only, nothing persists); the launch asks for `enable_virtual_env: false` (its per-model virtualenvs are built with
a network). Each stage is Xinference's own verdict, reported separately:

- registration: `POST /v1/model_registrations/LLM` parses the file with Xinference's `CustomLLMFamilyV2`;
- launch: `POST /v1/models` matches the spec (format, size, quantization) and loads the weights from `model_uri`;
- reply: `POST /v1/chat/completions`, greedy, rendered with the registration's chat template and stops.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.consumers import published, stops, venv_python
from pipeline.serve import chat, judge_reply, running
from pipeline.types import Status

XINFERENCE_PYTHON = "WEIGHTSMITH_XINFERENCE_PYTHON"
START_TIMEOUT = 300.0
LAUNCH_TIMEOUT = 900.0
SERVER = "Xinference's server (transformers engine)"
STAGES = ("registration", "launch", "reply")


def xinference_python() -> Path:
    """The Xinference virtualenv's interpreter: WEIGHTSMITH_XINFERENCE_PYTHON, else `.venv-xinference`."""
    return venv_python(XINFERENCE_PYTHON, ".venv-xinference")


def xinference_check(artifact: Path, log: Path, max_tokens: int | None = None) -> dict[str, Any]:
    """Register, launch and chat with the artifact in Xinference's own server; each stage as Xinference reports it."""
    manifest = published(artifact)
    python, registration = xinference_python(), artifact / "xinference.json"
    outcome: dict[str, Any] = {"server": SERVER, "script": registration.name, "cases": []}
    if not os.access(python, os.X_OK):
        why = f"no Xinference virtualenv at {python}: run `make xinference-venv` or set {XINFERENCE_PYTHON}"
        return {**outcome, "status": Status.NOT_RUN, "reason": why}
    if not registration.is_file():
        return {**outcome, "status": Status.NOT_RUN, "reason": f"no {registration.name}: the format writes none"}
    family = json.loads(registration.read_text(encoding="utf-8"))
    cases = (manifest.smoke or {}).get("generation", {}).get("cases", [])[:1]
    max_tokens = max_tokens or max([c.get("tokens", 0) for c in cases] + [1])  # as many as our runtime generated
    with tempfile.TemporaryDirectory(prefix="xinference-home-") as home:
        script = Path(home) / "xinference-local.sh"
        script.write_text('#!/bin/sh\ncd "$(dirname "$0")"\nexec xinference-local "$@"\n', encoding="utf-8")
        env = {"XINFERENCE_HOME": home, "XINFERENCE_AUTH_ADVANCED": "0", "PYTHONPATH": None, "VIRTUAL_ENV": None}
        start = time.perf_counter()
        try:
            with running(script, log, START_TIMEOUT, python=python, env=env) as url:
                outcome["startup_s"] = round(time.perf_counter() - start, 1)
                outcome.update(stages(url, family, cases, max_tokens))
        except (RuntimeError, OSError, ValueError) as exc:
            return {**outcome, "status": Status.FAILED, "reason": f"{SERVER}: {exc}"}
    return judged(outcome, stops(manifest, artifact), max_tokens)


def stages(url: str, family: dict[str, Any], cases: list[dict], max_tokens: int) -> dict[str, Any]:
    """Registration, launch and the replies, stopping at the first stage Xinference refuses (its `detail` kept)."""
    found: dict[str, Any] = {stage: {"status": Status.NOT_RUN} for stage in STAGES}
    spec, uid = family["model_specs"][0], "weightsmith-check"
    requests = {
        "registration": ("/v1/model_registrations/LLM", {"model": json.dumps(family), "persist": False}),
        "launch": ("/v1/models", {"model_uid": uid, "model_name": family["model_name"], "model_type": "LLM",
                                  "model_engine": "Transformers", "model_format": spec["model_format"],
                                  "model_size_in_billions": spec["model_size_in_billions"],
                                  "quantization": spec["quantization"], "enable_virtual_env": False}),
    }  # fmt: skip
    for stage, (path, body) in requests.items():
        start = time.perf_counter()
        error = post(f"{url}{path}", body)
        seconds = round(time.perf_counter() - start, 1)
        found[stage] = {"status": Status.FAILED if error else Status.OK, "seconds": seconds}
        if error:
            return {**found, "reason": f"Xinference's {stage}: {error}"}
    # Xinference's transformers engine adds a repetition penalty of 1.1 unless told otherwise (measured: the reply
    # left ours at the first repeated token); greedy decoding as our runtime's has none
    extra = {"model": uid, "repetition_penalty": 1.0}
    try:
        found["cases"] = [{"prompt": c["prompt"], "expected": c["text"], **chat(url, c["prompt"], max_tokens, extra)}
                          for c in cases]  # fmt: skip
    except (OSError, ValueError) as exc:
        return {**found, "reply": {"status": Status.FAILED}, "reason": f"Xinference's reply: {exc}"}
    return found


def post(url: str, body: dict[str, Any]) -> str | None:
    """POST `body` as JSON; None when the server says 2xx, else its error `detail` on one line."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=LAUNCH_TIMEOUT):
            return None
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", errors="replace")
        try:
            text = str(json.loads(text).get("detail", text))
        except (ValueError, AttributeError):
            pass
        return f"HTTP {exc.code}: {' '.join(text.split())[:500]}"


def judged(outcome: dict[str, Any], stop_texts: list[str], max_tokens: int) -> dict[str, Any]:
    """The overall status: failed at the first refused stage, or when a reply is not our runtime's greedy reply."""
    if outcome.get("reason"):
        return {**outcome, "status": Status.FAILED}
    problems = [p for case in outcome["cases"] for p in judge_reply(case, stop_texts, max_tokens)]
    if not outcome["cases"]:
        problems.append("the manifest has no smoke reply to compare with")
    status = Status.FAILED if problems else Status.OK
    return {**outcome, "reply": {"status": status}, "status": status, "reason": "; ".join(problems) or None}
