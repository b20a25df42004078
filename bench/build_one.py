"""Build one target the way the pipeline's build step does, in a process of its own (so that the benchmarks can
measure its wall time and peak memory):

    python bench/build_one.py SOURCE_DIR FORMAT QUANT OPTIONS_JSON OUT_DIR [SAMPLES SEQ_LEN]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.formats.base import BuildContext, Format  # noqa: E402
from pipeline.source import inspect_checkpoint  # noqa: E402
from pipeline.types import Calibration, Target  # noqa: E402


def command(source: Path, fmt: str, quant: str, options: dict, out: Path, calibration: Calibration | None = None):
    """The argv that builds this target in a child process."""
    extra = [str(calibration.samples), str(calibration.seq_len)] if calibration else []
    return [sys.executable, __file__, str(source), fmt, quant, json.dumps(options), str(out), *extra]


if __name__ == "__main__":
    source_dir, fmt, quant, options, out = sys.argv[1:6]
    calibration = Calibration(samples=int(sys.argv[6]), seq_len=int(sys.argv[7])) if len(sys.argv) > 7 else None
    target = Format.for_target(Target(format=fmt, quant=quant, options=json.loads(options)))
    source = inspect_checkpoint(Path(source_dir))
    target.check(source)
    target.build(source, Path(out), BuildContext(name="bench", calibration=calibration or Calibration()))
