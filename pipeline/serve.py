"""The serve check: an artifact's own hand-off script, run as written, answers a chat request the way our runtime did.

After validation a format that has a server (`Format.server_script`: llama.cpp's server for GGUF, `mlx_lm.server`
for MLX) gets one more step. Its script is started from the candidate's folder on a free loopback port (the script
passes extra arguments on to the server); once the server lists its model, the recipe's first prompt (`PROMPTS`)
goes in as an OpenAI-style chat request, greedy (temperature 0) and streamed, with as many tokens as the smoke test
generated. The server renders the artifact's own chat template; the reply must equal our runtime's greedy reply for
that prompt (`smoke.generation` in the manifest), with no stop text in it. The time to first token is recorded.
The server is stopped, its process group killed, on every path.

Plain `urllib` and `subprocess`: no client library is needed for three endpoints.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.types import Status

START_TIMEOUT = 300.0  # seconds for the server to load the model and answer /v1/models
REPLY_TIMEOUT = 300.0
PROMPTS = 1  # chat requests per serve check: the first smoke prompt (MLX's CPU server runs bf16 at ~1 s a token)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(script: Path, log: Path, timeout: float = START_TIMEOUT, python: Path | None = None,
            env: dict[str, str | None] | None = None) -> Iterator[str]:  # fmt: skip
    """Run `script` (from its folder, on a free loopback port) until the block ends; yield the server's base URL.
    RuntimeError with the end of its log when it exits or does not answer within `timeout` seconds. `python`: the
    interpreter the script's "$PYTHON" and PATH lead to (a consumer's own virtualenv; ours by default); `env`: more
    variables for the server (None: drop it)."""
    port = free_port()
    python = Path(python or sys.executable)
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": str(python),
           **(env or {})}  # fmt: skip
    env = {key: value for key, value in env.items() if value is not None}
    with open(log, "wb") as out:
        process = subprocess.Popen(["sh", str(script), "--host", "127.0.0.1", "--port", str(port)], cwd=script.parent,
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, log, timeout)
        yield url
    finally:
        stop(process)


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}: {tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s: {tail(log)}")


def stop(process: subprocess.Popen) -> None:
    """Stop the server and anything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def tail(log: Path, lines: int = 5) -> str:
    text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines() if log.is_file() else []
    return " | ".join(text[-lines:]) or "(no output)"


def chat(url: str, prompt: str, max_tokens: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One greedy, streamed chat completion: {"text", "finish_reason", "ttft_s", "total_s"}. No `model`: each server
    then answers with the one it was started with; no repetition penalty (llama-cpp-python's server would add 1.1),
    as our runtime's greedy decoding has none. `extra`: more request fields for one server."""
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0.0, "max_tokens": max_tokens,
            "stream": True, "repeat_penalty": 1.0, **(extra or {})}  # fmt: skip
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    start, first, parts, finish = time.perf_counter(), None, [], None
    with urllib.request.urlopen(request, timeout=REPLY_TIMEOUT) as response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[5:]).get("choices") or [{}])[0]
            if content := (choice.get("delta") or {}).get("content"):
                first = first or time.perf_counter()
                parts.append(content)
            finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    return {"text": "".join(parts), "finish_reason": finish, "ttft_s": round((first or end) - start, 3),
            "total_s": round(end - start, 3)}  # fmt: skip


def serve_check(script: Path, server: str, smoke: dict[str, Any], stops: list[str], max_tokens: int,
                log: Path) -> dict[str, Any]:  # fmt: skip
    """Start `script`, ask it each prompt of the smoke test, compare the replies with ours; stop it. The outcome:
    {"status", "server", "cases", "reason"}."""
    outcome: dict[str, Any] = {"server": server, "script": script.name, "cases": []}
    try:
        with running(script, log) as url:
            for case in smoke["generation"]["cases"][:PROMPTS]:
                reply = chat(url, case["prompt"], max_tokens)
                outcome["cases"].append({"prompt": case["prompt"], "expected": case["text"], **reply})
    except (RuntimeError, OSError, ValueError) as exc:
        return {**outcome, "status": Status.FAILED, "reason": f"{server}: {exc}"}
    problems = [problem for case in outcome["cases"] for problem in judge_reply(case, stops, max_tokens)]
    return {**outcome, "status": Status.FAILED if problems else Status.OK, "reason": "; ".join(problems) or None}


def comparable(text: str) -> str:
    """A reply as compared: without the outer spaces, and without U+FFFD, which a whole-sequence decode writes for a
    token holding part of a UTF-8 character where a streaming server holds those bytes back (measured: the same
    tokens came back as "fasci" from llama.cpp's server and "fasci\ufffd" from the tokenizer)."""
    return text.replace("\ufffd", "").strip()


def judge_reply(case: dict[str, Any], stops: list[str], max_tokens: int) -> list[str]:
    """What is wrong with one reply: not our runtime's greedy text, stop text leaking into it, no stop where ours
    stopped early."""
    problems = []
    if comparable(case["text"]) != comparable(case["expected"]):
        problems.append(f"the server replied {case['text']!r} to {case['prompt']!r}; our runtime {case['expected']!r}")
    if leaked := [s for s in stops if s and s in case["text"]]:
        problems.append(f"stop text {leaked[0]!r} in the server's reply to {case['prompt']!r}")
    return problems
