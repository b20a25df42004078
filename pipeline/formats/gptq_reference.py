"""GPTQModel as the quantizer (`quantizer: gptqmodel`): the maintained reference implementation, on the same
calibration samples, bits, group size and act-order settings, saved in the same GPTQ v1 layout."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path


def quantize_with_gptqmodel(source, spec, samples: list[list[int]], out_dir: Path) -> None:
    import torch

    from pipeline.formats.gptq import cpu_workers
    from pipeline.source import portable_config

    cpu_workers()
    from gptqmodel import GPTQModel, QuantizeConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act, sym=spec.sym,
                            static_groups=spec.static_groups, damp_percent=spec.damp, device=device)  # fmt: skip
    model = GPTQModel.load(str(source.path), config, trust_remote_code=source.trust_remote_code)  # device: config
    model.quantize([{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples], batch_size=1)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        model.save(scratch)
        for item in Path(scratch).iterdir():
            shutil.move(str(item), out_dir / item.name)
    path = out_dir / "config.json"  # GPTQModel saves through transformers 5: add the keys other readers look for
    path.write_text(json.dumps(portable_config(json.loads(path.read_text(encoding="utf-8"))), indent=2),
                    encoding="utf-8")  # fmt: skip
