"""Targets of one recipe side by side (pipeline.lanes): the memory budget, dependencies and lanes that run alone are
respected, an error stops new lanes, and a run with two targets at once writes what one after another writes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import yaml

from pipeline.lanes import Lane, run_lanes
from tests.conftest import REPO, write_recipe

GB = 1_000_000_000


def lane(key: str, memory: float = 1, after: tuple[str, ...] = (), alone: bool = False) -> Lane:
    return Lane(key, (), frozenset(after), int(memory * GB), alone)


class Recorder:
    """A lane runner that records which lanes were running whenever one started, and the order they finished in."""

    def __init__(self, fail: str | None = None):
        self.lock, self.active, self.seen, self.order, self.fail = threading.Lock(), set(), [], [], fail

    def __call__(self, lane: Lane, finished: dict) -> str:
        assert lane.after <= finished.keys(), f"{lane.key} started before {lane.after - finished.keys()}"
        with self.lock:
            self.active.add(lane.key)
            self.seen.append(frozenset(self.active))
        if lane.key == self.fail:
            raise RuntimeError(f"{lane.key} broke")
        time.sleep(0.3)
        with self.lock:
            self.active.discard(lane.key)
            self.order.append(lane.key)
        return f"manifest of {lane.key}"

    def together(self, *keys: str) -> bool:
        return any(set(keys) <= running for running in self.seen)


def test_lanes_run_side_by_side_within_the_memory_budget():
    run, todo = Recorder(), [lane("a", 2), lane("b", 2), lane("c", 3), lane("d", 1)]
    assert run_lanes(todo, run, workers=3, budget=5 * GB) == {k: f"manifest of {k}" for k in "abcd"}
    memory = {ln.key: ln.memory for ln in todo}
    assert all(sum(memory[k] for k in running) <= 5 * GB for running in run.seen), run.seen
    assert run.together("a", "b", "d")  # 5 GB: c (3 GB) waits for room, d (1 GB) fits beside a and b
    assert run.order[-1] == "c"


def test_a_lane_over_the_budget_runs_alone_and_so_does_an_unshareable_one():
    run = Recorder()
    run_lanes([lane("big", 9), lane("small", 1), lane("onnx", 1, alone=True), lane("other", 1)], run, 4, 5 * GB)
    assert {"big"} in run.seen and {"onnx"} in run.seen, run.seen
    assert not any(len(running) > 1 and running & {"big", "onnx"} for running in run.seen), run.seen
    assert run.together("small", "other")


def test_a_lane_waits_for_the_targets_it_is_made_from():
    run = Recorder()
    run_lanes([lane("gptq"), lane("compressed", after=("gptq",)), lane("gguf")], run, workers=3, budget=10 * GB)
    assert run.order.index("gptq") < run.order.index("compressed")
    assert run.together("gptq", "gguf") and not run.together("gptq", "compressed")


def test_one_worker_runs_the_lanes_in_plan_order_in_this_thread():
    seen = []
    run_lanes([lane("a"), lane("b", 99)], lambda ln, done: seen.append((ln.key, threading.current_thread())), 1, 0)
    assert seen == [("a", threading.current_thread()), ("b", threading.current_thread())]


def test_an_error_in_a_lane_stops_new_lanes_and_is_raised_after_the_running_ones_finish():
    run = Recorder(fail="a")
    with pytest.raises(RuntimeError, match="a broke"):
        run_lanes([lane("a"), lane("b"), lane("c", after=("a",)), lane("d", after=("b",))], run, 2, 10 * GB)
    assert run.together("a", "b") and run.order == ["b"]  # b, running beside a, finished; c and d never started


def artifact_digests(output, folder: str) -> dict[str, str]:
    root = output / "test-model" / folder
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("*.gguf")}


@pytest.mark.slow
def test_two_targets_at_once_write_what_one_after_another_writes(tiny_llama, tmp_path):
    """The CLI and the Prefect flow, with `concurrency: {targets: 2}`: both GGUF targets run side by side (the log
    says so), and their files and quality figures equal a one-after-another run's."""
    outputs = {}
    for name, concurrency, how in (("serial", 1, "cli"), ("cli", 2, "cli"), ("flow", 2, "flow")):
        (tmp_path / name).mkdir()
        path = write_recipe(tmp_path / name, tiny_llama, [("gguf", "f16"), ("gguf", "q8_0")])
        data = yaml.safe_load(path.read_text())
        data["concurrency"] = {"targets": concurrency}
        path.write_text(yaml.safe_dump(data))
        command = [sys.executable, "-m", "pipeline.cli", "convert", str(path)]
        if how == "flow":
            command = [sys.executable, "-c", f"from flows.convert import convert; convert({str(path)!r})"]
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                  "PREFECT_LOGGING_EXTRA_LOGGERS": "weightsmith"})  # fmt: skip
        log = run.stdout + run.stderr
        assert run.returncode == 0, log
        assert ("starting beside" in log) == (concurrency > 1), log
        outputs[name] = tmp_path / name / "artifacts"
    for folder in ("gguf-f16", "gguf-q8_0"):
        serial = json.loads((outputs["serial"] / "test-model" / folder / "manifest.json").read_text())
        assert serial["status"] == "ok"
        for name in ("cli", "flow"):
            manifest = json.loads((outputs[name] / "test-model" / folder / "manifest.json").read_text())
            assert manifest["status"] == "ok", manifest["reason"]
            assert artifact_digests(outputs[name], folder) == artifact_digests(outputs["serial"], folder)
            for figure in ("ppl", "kl_mean", "top1_agreement"):
                assert manifest["quality"][figure] == pytest.approx(serial["quality"][figure], rel=1e-6), figure
