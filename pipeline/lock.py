"""One writer per output folder: a run holds `<output>/<model>/.weightsmith.lock` while it builds, validates and
publishes there.

The lock is an advisory `flock` on that file, which the kernel releases when the holding process dies, however it
dies: a lock left by a killed run is stale by construction and the next run simply takes it. The file's contents
name the holder (host, pid, run id, start time), so a second run refuses with one line that says who is writing
(or waits for it, with `wait_s`). Only the holder deletes staging leftovers, so cleanup never touches the live
folders of another run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pipeline.types import OutputBusy, now

LOCK = ".weightsmith.lock"


@contextlib.contextmanager
def output_lock(folder: Path, wait_s: float = 0.0, run_id: str | None = None) -> Iterator[dict]:
    """Hold the output folder's lock for the duration; raise OutputBusy naming the holder if another run has it
    (after waiting up to `wait_s` seconds for it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OutputBusy(f"{folder}: another run is writing here ({describe(holder(path))}); wait for it "
                                     f"to finish, or give this run another output") from None  # fmt: skip
                time.sleep(1)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id or uuid.uuid4().hex[:12],
              "started_at": now()}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        try:
            yield me
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def describe(who: dict) -> str:
    if not who:
        return "holder unknown"
    return f"pid {who.get('pid')} on {who.get('host')}, run {who.get('run_id')}, since {who.get('started_at')}"
