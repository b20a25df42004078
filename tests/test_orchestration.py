"""Running it for real: resume after a crash, the batch flow, and deployments on a Prefect server with workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_recipe

PREFECT = str(Path(sys.executable).with_name("prefect"))


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)  # fmt: skip


def test_a_rerun_after_sigkill_resumes(tiny_llama, tmp_path):
    path = write_recipe(tmp_path, tiny_llama, [("gguf", "f16"), ("gptq", "int4")])
    data = yaml.safe_load(path.read_text())
    data["targets"][1]["options"] = {"group_size": 32}
    data["calibration"] = {"samples": 64, "seq_len": 256}  # long enough to be killed in the middle
    path.write_text(yaml.safe_dump(data))
    root = tmp_path / "artifacts" / "test-model"
    run = cli("convert", "--no-prefect", str(path))
    deadline = time.monotonic() + 300
    while not list(root.glob("..gptq-int4.candidate.partial-*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.poll() is None, "the run ended before the GPTQ build could be interrupted"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    first = json.loads((root / "gguf-f16" / "manifest.json").read_text())
    assert first["status"] == "ok" and not (root / "gptq-int4").exists()

    rerun = cli("convert", "--no-prefect", str(path))
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert "gguf/f16: up to date" in out and "removed ..gptq-int4.candidate.partial-" in out
    again = json.loads((root / "gguf-f16" / "manifest.json").read_text())
    assert again == first  # untouched: same timestamps, same file hashes
    assert json.loads((root / "gptq-int4" / "manifest.json").read_text())["status"] == "ok"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [".weightsmith.lock"]  # no leftovers

    forced = cli("convert", "--no-prefect", "--force", "--only", "gguf/f16", str(path))
    out, _ = forced.communicate(timeout=600)
    assert forced.returncode == 0 and "up to date" not in out
    assert json.loads((root / "gguf-f16" / "manifest.json").read_text())["updated_at"] >= first["updated_at"]


def test_a_changed_budget_redoes_the_target(tiny_llama, tmp_path):
    from pipeline.convert import run_recipe
    from pipeline.recipe import load_recipe

    path = write_recipe(tmp_path, tiny_llama, [("gguf", "f16")])
    first = run_recipe(load_recipe(path))
    assert [r["resumed"] for r in first["targets"]] == [False]
    assert [r["resumed"] for r in run_recipe(load_recipe(path))["targets"]] == [True]
    path = write_recipe(tmp_path, tiny_llama, [("gguf", "f16")], budgets={"gguf/f16": {"max_ppl_ratio": 1.01}})
    assert [r["resumed"] for r in run_recipe(load_recipe(path))["targets"]] == [False]


def test_an_edited_held_out_text_at_the_same_path_redoes_the_target(tiny_llama, tmp_path):
    from pipeline.convert import run_recipe
    from pipeline.corpus import load_text
    from pipeline.recipe import load_recipe

    text = tmp_path / "held-out.txt"
    text.write_text(load_text("builtin:corpus", "held_out"))
    path = write_recipe(tmp_path, tiny_llama, [("gguf", "f16")], held_out=str(text))
    assert [r["resumed"] for r in run_recipe(load_recipe(path))["targets"]] == [False]
    assert [r["resumed"] for r in run_recipe(load_recipe(path))["targets"]] == [True]
    text.write_text(text.read_text().replace("Alice", "Alicia"))  # same path, other contents
    (row,) = run_recipe(load_recipe(path))["targets"]
    assert row["resumed"] is False and row["status"] == "ok"


def test_batch_converts_every_recipe_and_reports_a_failure(tiny_llama, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    good = write_recipe(tmp_path, tiny_llama, [("gguf", "f16")])
    good.rename(folder / "a-good.yaml")
    bad = write_recipe(tmp_path, tiny_llama, [("gguf", "q4_0")], budgets={"gguf/q4_0": {"max_ppl_ratio": 1.0000001}})
    data = yaml.safe_load(bad.read_text())
    data["name"] = "test-model-bad"
    (folder / "b-bad.yaml").write_text(yaml.safe_dump(data))
    script = (f"from flows.batch import batch\nstate = batch({str(folder)!r}, return_state=True)\n"
              "print('STATE', state.type.value)\nprint('MESSAGE', state.message)")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})  # fmt: skip
    out = run.stdout + run.stderr
    assert "STATE FAILED" in out, out
    assert "1 of 2 recipe(s) failed" in out and "b-bad.yaml" in out
    assert (
        json.loads((tmp_path / "artifacts" / "test-model" / "gguf-f16" / "manifest.json").read_text())["status"] == "ok"
    )
    bad_manifest = tmp_path / "artifacts" / "test-model-bad" / "gguf-q4_0" / "manifest.json"
    assert json.loads(bad_manifest.read_text())["status"] == "failed"


def test_route_prefers_the_first_kind_and_falls_back_only_when_allowed():
    from pipeline.hardware import route

    cpu, online = frozenset({"cpu"}), {"apple"}.__contains__
    assert route(("cpu", "cuda"), cpu, True, online) is None  # preferred kind here
    assert route(("apple", "cpu", "cuda"), cpu, True, online) == "apple"  # a worker there: hand it over
    assert route(("cuda", "cpu"), cpu, True, online) is None  # nobody on cuda: fall back here
    assert route(("cuda", "cpu"), cpu, False, online) == "cuda"  # the recipe forbids falling back: wait there
    assert route(("cuda",), cpu, True, online) == "cuda"  # nothing here can run it
    assert route(("cuda",), frozenset({"cpu", "cuda"}), True, online) is None


def test_declared_hardware_replaces_detection(monkeypatch):
    from pipeline import hardware

    hardware.available.cache_clear()
    try:
        monkeypatch.setenv("WEIGHTSMITH_HARDWARE", "apple")
        assert hardware.available() == {"cpu", "apple"}
        hardware.available.cache_clear()
        monkeypatch.setenv("WEIGHTSMITH_HARDWARE", "cpu,tpu")
        with pytest.raises(ValueError, match="unknown kind.*tpu.*kinds: cpu, cuda, apple"):
            hardware.available()
    finally:
        hardware.available.cache_clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server on a free loopback port (SQLite in a temporary PREFECT_HOME), two process workers of
    the `cpu` pool (`cpu-a`, `cpu-b`, as if on two machines; at most 2 flow runs each) and one of `apple`."""
    import httpx

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "PREFECT_LOGGING_EXTRA_LOGGERS": "weightsmith", "PWD": str(REPO),
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # workers look for flow runs every 2 s, not 10  # fmt: skip
    logs = [(tmp_path / f"{name}.log").open("w") for name in ("server", "cpu-a", "cpu-b", "apple-worker")]
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=logs[0], stderr=subprocess.STDOUT)  # fmt: skip
    workers = []
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(1)
        for pool in ("cpu", "cuda", "apple"):  # a cuda pool with no worker: steps handed to it must time out
            subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                           capture_output=True)  # fmt: skip
        deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, capture_output=True,
                                text=True)  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        for name, log in zip(("cpu-a", "cpu-b"), logs[1:3]):
            workers.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "cpu", "--type", "process",
                                             "--name", name, "--limit", "2"], env=env, cwd=tmp_path, stdout=log,
                                            stderr=subprocess.STDOUT))  # fmt: skip
        # another worker on this machine plays the Mac: it declares `apple` hardware (its MLX runs on MLX's CPU
        # backend, and the manifest says so)
        workers.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "apple", "--type", "process"],
                                        env={**env, "WEIGHTSMITH_HARDWARE": "cpu,apple"}, cwd=tmp_path,
                                        stdout=logs[3], stderr=subprocess.STDOUT))  # fmt: skip
        yield env
    finally:
        for process in (*workers, server):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        for log in logs:
            log.close()


def run_deployment(env, name: str, **params) -> subprocess.CompletedProcess:
    args = [f"{key}={json.dumps(value)}" for key, value in params.items()]
    command = [PREFECT, "deployment", "run", name, "--watch", "--watch-timeout", "900"]
    return subprocess.run(command + [a for arg in args for a in ("--param", arg)], env=env, capture_output=True,
                          text=True, timeout=1000)  # fmt: skip


@pytest.mark.slow
def test_deployments_run_on_a_server_with_a_cpu_worker(prefect_server, smollm2_dir, tiny_model, tmp_path):
    import httpx

    env, output = prefect_server, tmp_path / "artifacts"
    run = run_deployment(env, "convert/smollm2", only=["gguf/f16"], output=str(output))
    assert run.returncode == 0 and "COMPLETED" in run.stdout.upper(), run.stdout + run.stderr
    manifest = json.loads((output / "smollm2-135m" / "gguf-f16" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["quality"]["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)

    # routing: the apple pool has a worker online, the cuda pool none
    probe = "from flows.convert import workers_online as w; print('ONLINE', w('apple'), w('cuda'), w('no-such-pool'))"
    deadline = time.monotonic() + 120
    while "ONLINE True" not in (seen := subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO,
                                                       capture_output=True, text=True)).stdout:  # fmt: skip
        assert time.monotonic() < deadline, f"the apple worker never came online: {seen.stdout}{seen.stderr}"
        time.sleep(2)
    assert "ONLINE True False False" in seen.stdout

    # the hub is unreachable here: convert/qwen runs on a local tiny checkpoint (Llama: the tiny Qwen2 borrows
    # SmolLM2's tokenizer, which mlx-lm would swap for Qwen2's pre-tokenizer). MLX prefers apple: its build and smoke
    # test are handed to the apple worker. The TensorRT engine step needs cuda, where no worker runs: it waits the
    # dispatch timeout, then ends not_run. GGUF and the TensorRT checkpoint run here, on the cpu worker.
    run = run_deployment(env, "convert/qwen", only=["gguf/f16", "mlx/q8", "tensorrt/fp16"], output=str(output),
                         source=str(tiny_model("llama")), dispatch_timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    qwen = output / "qwen2.5-0.5b-instruct"
    assert json.loads((qwen / "gguf-f16" / "manifest.json").read_text())["status"] == "ok"
    trt = json.loads((qwen / "tensorrt-fp16" / "manifest.json").read_text())
    assert trt["status"] == "not_run" and "no_cuda_worker" in trt["reason"] and "within 60 s" in trt["reason"]
    assert trt["steps"] == {"build": "built", "validate": "ok", "engine": "not_run"}
    assert trt["smoke"]["engine"]["build"]["reason"] == "no_cuda_worker"
    mlx = json.loads((qwen / "mlx-q8" / "manifest.json").read_text())
    assert mlx["status"] == "ok", mlx["reason"]
    assert "apple" in mlx["built_on"]["kinds"] and "apple" in mlx["validated_on"]["kinds"]
    assert mlx["smoke"]["runtime"]["backend"] == "cpu"  # what MLX really ran on
    assert mlx["steps"]["serve"] == "ok" and mlx["serve"]["server"] == "mlx_lm.server"
    runs = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json={}, timeout=10).json()
    handed = {(r["parameters"].get("target"), r["parameters"].get("step")): (r["work_pool_name"], r["state_type"])
              for r in runs if "step" in r["parameters"]}  # fmt: skip
    assert handed == {
        ("mlx/q8", "build"): ("apple", "COMPLETED"),
        ("mlx/q8", "validate"): ("apple", "COMPLETED"),
        ("mlx/q8", "serve"): ("apple", "COMPLETED"),  # mlx_lm.server runs where the MLX validation ran
        ("tensorrt/fp16", "engine"): ("cuda", "CANCELLED"),  # the step/cuda run nobody picked up
    }

    response = httpx.post(f"{env['PREFECT_API_URL']}/artifacts/filter", json={"artifacts": {"key": {"any_": [
        "convert-smollm2-135m", "convert-qwen2-5-0-5b-instruct"]}}}, timeout=10)  # fmt: skip
    tables = {a["key"]: a["data"] for a in response.json() if a["type"] == "table"}
    rows = json.loads(tables["convert-smollm2-135m"]) if isinstance(tables["convert-smollm2-135m"], str) else tables[
        "convert-smollm2-135m"]  # fmt: skip
    assert [(r["target"], r["status"]) for r in rows] == [("gguf/f16", "ok")]
    assert "convert-qwen2-5-0-5b-instruct" in tables

    # batch under a deployment: each of three recipes submitted as its own flow run of convert/recipe, picked up by
    # the two cpu workers (the batch run holds one of cpu-a's or cpu-b's 2 slots, so three recipes at once need both)
    recipes, names = tmp_path / "batch", ("one", "two", "three")
    recipes.mkdir()
    for name in names:
        (tmp_path / name).mkdir()
        data = yaml.safe_load(write_recipe(tmp_path / name, tiny_model("llama"), [("gguf", "f16"), ("gguf", "q8_0")])
                              .read_text())  # fmt: skip
        data["name"] = f"batch-{name}"
        (recipes / f"{name}.yaml").write_text(yaml.safe_dump(data))
    run = run_deployment(env, "batch/nightly", folder=str(recipes))
    assert run.returncode == 0 and "COMPLETED" in run.stdout.upper(), run.stdout + run.stderr
    runs = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json={}, timeout=10).json()
    deployments = {d["id"]: d["name"] for d in httpx.post(f"{env['PREFECT_API_URL']}/deployments/filter", json={},
                                                          timeout=10).json()}  # fmt: skip
    submitted = [r for r in runs if deployments.get(r["deployment_id"]) == "recipe"]
    assert sorted(Path(r["parameters"]["recipe_path"]).stem for r in submitted) == sorted(names)
    assert all(r["state_type"] == "COMPLETED" for r in submitted)
    for name in names:
        for folder in ("gguf-f16", "gguf-q8_0"):
            manifest = json.loads((tmp_path / name / "artifacts" / f"batch-{name}" / folder / "manifest.json")
                                  .read_text())  # fmt: skip
            assert manifest["status"] == "ok" and manifest["steps"]["validate"] == "ok", manifest
    # the three flow runs ran at the same time (one instant inside all three), on both workers
    starts = [datetime.fromisoformat(r["start_time"]) for r in submitted]
    ends = [datetime.fromisoformat(r["end_time"]) for r in submitted]
    assert max(starts) < min(ends), list(zip(starts, ends))
    ran_by = {r["id"]: [w for w in ("cpu-a", "cpu-b") if ran_on(tmp_path / f"{w}.log", r["id"])]
              for r in submitted}  # fmt: skip
    assert all(len(by) == 1 for by in ran_by.values()), ran_by
    assert {by[0] for by in ran_by.values()} == {"cpu-a", "cpu-b"}, ran_by


def ran_on(log, flow_run: str) -> bool:
    """Whether the worker writing `log` ran `flow_run`: both workers may pick up a scheduled run and log
    "submitting"; the one that loses the race to set it Pending then logs that it aborted the submission (Prefect's
    workers/base.py; seen in CI)."""
    text = log.read_text()
    return f"submitting flow run '{flow_run}'" in text and f"Aborted submission of flow run '{flow_run}'" not in text
