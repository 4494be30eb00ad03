"""A Triton Inference Server model repository for the exported ONNX graph (onnxruntime backend)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from advmoe import MoENet

from .graph import INPUT, LOGITS, ROUTING

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")


def config_pbtxt(name: str, model: MoENet, max_batch_size: int = 64) -> str:
    """config.pbtxt: named tensors with per-sample dims (Triton adds the batch axis),
    dynamic batching up to max_batch_size, one CPU instance (set KIND_GPU on a GPU host)."""
    cfg = model.cfg
    outputs = [f'  {{ name: "{LOGITS}" data_type: TYPE_FP32 dims: [ {cfg.num_classes} ] }}']
    if cfg.is_moe:
        outputs.append(f'  {{ name: "{ROUTING}" data_type: TYPE_INT64 dims: [ {len(model.moe_layers)} ] }}')
    preferred = ", ".join(str(b) for b in (8, 16, 32, 64) if b <= max_batch_size) or str(max_batch_size)
    return f"""name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{ name: "{INPUT}" data_type: TYPE_FP32 dims: [ {cfg.in_channels}, {cfg.image_size}, {cfg.image_size} ] }}
]
output [
{(","+chr(10)).join(outputs)}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: 2000
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def write_repository(repo: Path, name: str, onnx_file: Path, model: MoENet, max_batch_size: int = 64) -> Path:
    """repo/<name>/1/model.onnx and repo/<name>/config.pbtxt; returns the model's folder."""
    if not NAME.match(name):
        raise ValueError(f"Triton model name {name!r}: use letters, digits, '_', '-' or '.' (at most 63)")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(onnx_file, folder / "1" / "model.onnx")
    (folder / "config.pbtxt").write_text(config_pbtxt(name, model, max_batch_size))
    return folder
