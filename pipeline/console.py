"""What a person at the terminal sees: weightsmith's own progress, concise; everything else in a log file.

`quiet_libraries()` runs before the heavy libraries are imported: their progress bars and import-time chatter
(transformers, huggingface_hub, torch, torchao) go to the log instead of the terminal. `start_log()` sends every
record, Python warnings included, to `<cache>/logs/<name>-<time>.log`; the terminal gets weightsmith's records at
INFO (DEBUG and the libraries' too with `--debug`). `progress()` is the callback long stages report to: a bar
redrawn in place on a terminal, a line every few seconds otherwise (and in Prefect's logs).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from pipeline.files import cache_root

QUIET = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TORCH_LOGS": "-all",  # torch's loggers print to stderr themselves (not through ours): errors only
    "TQDM_DISABLE": "1",
}
LIBRARIES = ("torch", "torchao", "transformers", "huggingface_hub", "accelerate", "gptqmodel", "onnxscript", "mlx")
log = logging.getLogger("weightsmith")


def quiet_libraries(debug: bool = False) -> None:
    if not debug:
        for key, value in QUIET.items():
            os.environ.setdefault(key, value)


def log_folder() -> Path:
    """Where run logs (and the logs of servers started by the serve check) go."""
    folder = cache_root() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start_log(name: str, debug: bool = False) -> Path:
    """Log everything to a file for this run; weightsmith's INFO (everything's DEBUG with `debug`) to the terminal."""
    folder = log_folder()
    path = folder / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(to_file)
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    for library in LIBRARIES:  # their records go to the file; the terminal only hears from them with --debug
        logging.getLogger(library).setLevel(logging.DEBUG if debug else logging.INFO)
        logging.getLogger(library).propagate = True
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    terminal.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        terminal.addFilter(lambda record: record.name == "weightsmith" or record.levelno >= logging.ERROR)
    root.addHandler(terminal)
    return path


def progress(key: str, every_s: float = 5.0):
    """A progress callback (done, total, what) for a long stage of target `key`."""
    bar = sys.stderr.isatty()
    last = [0.0]

    def report(done: int, total: int, what: str) -> None:
        if bar:
            filled = int(30 * done / max(total, 1))
            end = "\n" if done == total else ""
            sys.stderr.write(f"\r{key}: [{'#' * filled}{' ' * (30 - filled)}] {done}/{total} {what[:40]:<40}{end}")
            sys.stderr.flush()
        elif done == total or time.monotonic() - last[0] > every_s:
            last[0] = time.monotonic()
            log.info("%s: %d/%d (%s)", key, done, total, what)

    return report
