"""A Triton Inference Server model repository: the ONNX graph for the onnxruntime backend, and
the TorchScript module for the PyTorch backend (platform pytorch_libtorch), side by side."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from advmoe import MoENet
from advmoe.runtimes import RUNTIMES

from .graph import INPUT, LOGITS, ROUTING

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
# runtime (advmoe.runtimes) -> (the model name's suffix, the config line that picks Triton's backend)
BACKENDS = {
    "onnxruntime": ("", 'backend: "onnxruntime"'),
    # The PyTorch backend matches the input to forward()'s argument name and, as the output
    # names have no "__<index>", the outputs by their order in the config: (logits, routing).
    "torchscript": ("_libtorch", 'platform: "pytorch_libtorch"'),
}


def model_name(name: str, runtime: str) -> str:
    """The Triton model name of a runtime's model: `name` (ONNX) or `name_libtorch` (TorchScript)."""
    full = name + BACKENDS[runtime][0]
    if not NAME.match(full):
        raise ValueError(f"Triton model name {full!r}: use letters, digits, '_', '-' or '.' (at most 63)")
    return full


LABELS = "labels.txt"  # the class names, one a line in index order: Triton's label_filename


def config_pbtxt(name: str, model: MoENet, max_batch_size: int = 64, runtime: str = "onnxruntime",
                 labels: bool = False) -> str:
    """config.pbtxt: named tensors with per-sample dims (Triton adds the batch axis),
    dynamic batching up to max_batch_size, one CPU instance (set KIND_GPU on a GPU host). With
    `labels`, the logits name LABELS, so Triton's classification extension answers class names."""
    cfg = model.cfg
    label = f' label_filename: "{LABELS}"' if labels else ""
    outputs = [f'  {{ name: "{LOGITS}" data_type: TYPE_FP32 dims: [ {cfg.num_classes} ]{label} }}']
    if cfg.is_moe:
        outputs.append(f'  {{ name: "{ROUTING}" data_type: TYPE_INT64 dims: [ {len(model.moe_layers)} ] }}')
    preferred = ", ".join(str(b) for b in (8, 16, 32, 64) if b <= max_batch_size) or str(max_batch_size)
    return f"""name: "{name}"
{BACKENDS[runtime][1]}
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


def write_repository(repo: Path, name: str, files: dict[str, Path], model: MoENet, max_batch_size: int = 64,
                     classes: list[str] | None = None) -> list[Path]:
    """repo/<model name>/1/<file> and repo/<model name>/config.pbtxt for each runtime's file in
    `files` ({"onnxruntime": model.onnx, "torchscript": model.pt}), and LABELS beside the config
    when the class names are given; returns the models' folders."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
    if classes is not None and (len(classes) != model.cfg.num_classes or any("\n" in c for c in classes)):
        raise ValueError(f"{len(classes)} class names for a model of {model.cfg.num_classes} classes (each on one line)")
    folders = []
    for runtime, file in files.items():
        full = model_name(name, runtime)
        folder = repo / full
        (folder / "1").mkdir(parents=True)
        shutil.copyfile(file, folder / "1" / RUNTIMES[runtime].file)
        (folder / "config.pbtxt").write_text(config_pbtxt(full, model, max_batch_size, runtime, classes is not None))
        if classes is not None:
            (folder / LABELS).write_text("".join(f"{c}\n" for c in classes))
        folders.append(folder)
    return folders
