"""What the benchmarks share: measuring one child process, and printing a table."""

from __future__ import annotations

import subprocess
import tempfile
import time


def measure(cmd: list[str], env: dict | None = None, stop_when=None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process and everything it starts; raises if it fails. With
    `stop_when`, the child is killed (SIGKILL) once `stop_when()` is true, and that is not a failure.

    The peak is the larger of the child's own high-water mark (VmHWM, which catches short spikes) and the largest
    sum of resident memory over the child and its descendants seen while polling (tools that do their work in a
    subprocess). rusage's maxrss is not used: it would include this (larger) parent's RSS at fork time."""
    import psutil

    with tempfile.TemporaryFile() as log:  # a pipe would fill up with llama-quantize's log and stall it
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak_kb, stopped = 0, False
        while proc.poll() is None:
            peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid), _tree_rss_kb(psutil, proc.pid))
            if stop_when is not None and stop_when():
                proc.kill()
                proc.wait()
                stopped = True
            time.sleep(0.01)
        wall = time.perf_counter() - start
        if proc.returncode != 0 and not stopped:
            log.seek(0)
            raise RuntimeError(f"{cmd[:3]} failed: {log.read().decode(errors='replace')[-2000:]}")
    return wall, peak_kb / 1024


def _tree_rss_kb(psutil, pid: int) -> int:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) // 1024
    except psutil.Error:
        return 0


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def print_table(header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
