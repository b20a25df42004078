"""What machine a step ran on, which hardware kinds it offers, and which library versions were used."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
from collections.abc import Callable
from functools import lru_cache

LIBRARIES = (
    "weightsmith",
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "gguf",
    "llama-cpp-python",
    "numpy",
    "prefect",
)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def describe() -> dict:
    import psutil

    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kinds": sorted(available()),
    }
    if "cuda" in info["kinds"]:
        import torch

        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


KINDS = ("cpu", "cuda", "apple")


@lru_cache(maxsize=1)
def available() -> frozenset[str]:
    """Hardware kinds this machine offers: always `cpu`; `cuda` with a usable CUDA device; `apple` on Apple silicon.

    `WEIGHTSMITH_HARDWARE=cpu,cuda` declares them instead of detecting them: a worker kept off a GPU that other work
    owns, or a second worker on one machine that plays another pool's part in a test of the routing."""
    if declared := os.environ.get("WEIGHTSMITH_HARDWARE", "").strip():
        kinds = {k.strip() for k in declared.split(",") if k.strip()}
        if unknown := kinds - set(KINDS):
            raise ValueError(f"WEIGHTSMITH_HARDWARE: unknown kind(s) {', '.join(sorted(unknown))} "
                             f"(kinds: {', '.join(KINDS)})")  # fmt: skip
        return frozenset(kinds | {"cpu"})
    kinds = {"cpu"}
    try:
        import torch

        if torch.cuda.is_available():
            kinds.add("cuda")
    except ImportError:
        pass
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        kinds.add("apple")
    return frozenset(kinds)


def route(wanted: tuple[str, ...], here: frozenset[str], fallback: bool, online: Callable[[str], bool]) -> str | None:
    """Where a step that can run on `wanted` (preferred first) runs, seen from a machine offering `here`: None for
    this machine, else the hardware pool to hand it to. Here when this machine has the preferred kind; the preferred
    pool when a worker is online there, when nothing here can run the step, or when the recipe forbids falling back
    (`hardware_fallback: false`); else here, on the next kind it supports."""
    preferred = wanted[0]
    if preferred in here:
        return None
    if set(wanted) & here and fallback and not online(preferred):
        return None
    return preferred


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in (*LIBRARIES, *extra):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def torch_threads() -> int:
    """Threads for CPU inference: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
