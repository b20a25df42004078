"""A plan's targets side by side on one machine, within a memory budget.

A lane is one target's steps, in order. A lane starts once every target it is made from has finished its own lane.
With the recipe's `concurrency.targets` above 1, up to that many lanes run at once, as long as the sum of their
estimated peak memory (`pipeline.resources`, each format's `needs`) stays within the budget: the recipe's
`concurrency.memory_gb`, else the memory available when the run starts. A lane larger than the budget runs when no
other does (the resource check before the run has already judged whether it fits the machine at all). A lane whose
format is not known to be safe beside others in one process (`Format.shares_process` false: torch's ONNX exporter
keeps global tracing state, MLX one default stream) runs alone. With 1 (the default) the lanes run one after another
in this thread, exactly the plan's order.

Threads, not processes: the heavy work (torch, llama.cpp through ctypes, safetensors I/O) releases the GIL, and the
steps stay tasks of one Prefect flow run. Each lane runs in a copy of the caller's context (contextvars), which
carries Prefect's flow-run context. A lane that raises (a bug, not a failed target: steps record those in the
manifest) stops new lanes from starting; the running ones finish, then the error is raised.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from pipeline.plan import Plan, PlannedStep
from pipeline.types import Manifest

log = logging.getLogger("weightsmith")


@dataclass(frozen=True)
class Lane:
    key: str
    steps: tuple[PlannedStep, ...]
    after: frozenset[str]  # targets whose lanes must finish first
    memory: int  # estimated peak resident bytes
    alone: bool  # runs with no other lane beside it


def lanes(plan: Plan, memory: dict[str, int] | None = None) -> list[Lane]:
    """The plan's lanes, in plan order (each target after the ones it is made from)."""
    memory = memory or {}
    out = []
    for target in plan.targets():
        steps = tuple(s for s in plan.steps if s.key == target.key)
        after = frozenset(k for s in steps for k in s.inputs)
        alone = not plan.formats[target.key].shares_process
        out.append(Lane(target.key, steps, after, memory.get(target.key, 0), alone))
    return out


LaneRunner = Callable[[Lane, dict[str, Manifest]], Manifest]


def run_lanes(todo: list[Lane], run: LaneRunner, workers: int = 1, budget: int = 0) -> dict[str, Manifest]:
    """Every lane's final manifest by target key; `run(lane, finished)` runs one lane's steps."""
    finished: dict[str, Manifest] = {}
    if workers <= 1:
        for lane in todo:
            finished[lane.key] = run(lane, dict(finished))
        return finished
    pending, running = list(todo), {}
    error: BaseException | None = None
    with ThreadPoolExecutor(workers, thread_name_prefix="lane") as pool:
        while running or (pending and error is None):
            for lane in list(pending) if error is None else []:
                if can_start(lane, running.values(), finished, workers, budget):
                    pending.remove(lane)
                    if running:
                        log.info("%s: starting beside %s", lane.key, ", ".join(r.key for r in running.values()))
                    context = contextvars.copy_context()
                    running[pool.submit(context.run, run, lane, dict(finished))] = lane
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                lane = running.pop(future)
                error = error or collect(future, lane, finished)
    if error is not None:
        raise error
    return finished


def collect(future: Future, lane: Lane, finished: dict[str, Manifest]) -> BaseException | None:
    try:
        finished[lane.key] = future.result()
    except BaseException as exc:  # re-raised by run_lanes once the lanes running beside it have finished
        log.error("%s: stopped by %s: %s; no new targets start", lane.key, type(exc).__name__, exc)
        return exc
    return None


def can_start(lane: Lane, running: Iterable[Lane], finished: dict[str, Manifest], workers: int, budget: int) -> bool:
    """Whether `lane` may start now beside the lanes `running`."""
    running = list(running)
    if not lane.after <= finished.keys() or len(running) >= workers:
        return False
    if not running:
        return True
    if lane.alone or any(r.alone for r in running):
        return False
    return sum(r.memory for r in running) + lane.memory <= budget
