"""GPTQModel as the quantizer (`quantizer: gptqmodel`): the maintained reference implementation, on the same
calibration samples, bits, group size and act-order settings, saved in the same GPTQ v1 layout."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path


def quantize_with_gptqmodel(source, spec, samples: list[list[int]], out_dir: Path) -> list[dict]:
    """Quantize into `out_dir`; return GPTQModel's own per-layer losses (from the log it writes)."""
    import torch

    from pipeline.checkpoint import portable_config
    from pipeline.runtimes.transformers import cpu_workers

    cpu_workers()
    from gptqmodel import GPTQModel, QuantizeConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act, sym=spec.sym,
                            static_groups=spec.static_groups, damp_percent=spec.damp, device=device)  # fmt: skip
    model = GPTQModel.load(str(source.path), config, trust_remote_code=source.trust_remote_code)  # device: config
    from gptqmodel.looper import loop_processor

    with tempfile.TemporaryDirectory(dir=out_dir.parent) as logs:
        loop_processor._PROJECT_LOG_DIR = Path(logs)  # it would write ./logs/ in the user's working directory
        model.quantize([{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples], batch_size=1)
        layers = _losses(Path(logs))
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        model.save(scratch)
        for item in Path(scratch).iterdir():
            shutil.move(str(item), out_dir / item.name)
    path = out_dir / "config.json"  # GPTQModel saves through transformers 5: add the keys other readers look for
    path.write_text(json.dumps(portable_config(json.loads(path.read_text(encoding="utf-8"))), indent=2),
                    encoding="utf-8")  # fmt: skip
    return layers


def _losses(folder: Path) -> list[dict]:
    """GPTQModel's log: concatenated JSON objects, one per quantized module, with its own `loss` figure."""
    decoder, by_layer = json.JSONDecoder(), {}
    for path in sorted(folder.glob("*.log")):
        text, at = path.read_text(encoding="utf-8"), 0
        while (at := _skip_space(text, at)) < len(text):
            entry, at = decoder.raw_decode(text, at)
            errors = by_layer.setdefault(int(entry["layer"]), {})
            errors[entry["module"]] = {"gptqmodel_loss": float(entry["loss"])}
    return [{"layer": layer, "errors": errors} for layer, errors in sorted(by_layer.items())]


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at
