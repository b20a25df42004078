"""Text for calibration and held-out evaluation.

`builtin:corpus` is the shipped public-domain corpus (see data/README.md), cut once at a paragraph boundary into a
calibration part and a held-out part that never overlap. Any other value is a path to a UTF-8 text file, used whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

BUILTIN = "builtin:corpus"
CORPUS_FILE = Path(__file__).parent / "data" / "corpus.txt"
EVAL_FRACTION = 0.2


def split_corpus(text: str, eval_fraction: float = EVAL_FRACTION) -> tuple[str, str]:
    """(calibration, held_out): the held-out part is the last `eval_fraction` of the text, starting at a paragraph."""
    cut = text.find("\n\n", int(len(text) * (1 - eval_fraction)))
    if cut < 0:
        raise ValueError("text too short to split at a paragraph boundary")
    return text[:cut].rstrip("\n") + "\n", text[cut:].lstrip("\n")


def load_text(spec: str, part: Literal["calibration", "held_out"]) -> str:
    if spec == BUILTIN:
        calibration, held_out = split_corpus(CORPUS_FILE.read_text(encoding="utf-8"))
        return calibration if part == "calibration" else held_out
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{part} text {spec!r}: no such file (use {BUILTIN!r} or a path to a UTF-8 text file)")
    return path.read_text(encoding="utf-8")
