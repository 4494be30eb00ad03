"""AOTInductor package (model.pt2 of `torch._inductor.aoti_compile_and_package`): the
torch.export program compiled ahead of time to C++ kernels, dynamic batch axis; loads with
`torch._inductor.aoti_load_package` in Python, or `torch::inductor::AOTIModelPackageLoader`
in C++. The successor of TorchScript for running without Python.

Three settings work around torch 2.14.1 bugs that otherwise give wrong or refused results; the
parity check runs on the compiled package, so a regression is caught before anything is kept:
- `layout_optimization` off: inductor turns conv inputs channels_last, and for a conv on an
  expert's group (a size known only at run time) it then reads the channels_last output as if
  it were contiguous: wrong logits.
- `backed_size_oblivious`, and NNPACK off while compiling: choosing a conv backend compares the
  batch size with 16 and 1 (NNPACK's check is reached with one thread); the compiler records
  the example batch's answers as run-time checks (2 <= batch <= 15), so other batch sizes
  would be refused. With them those comparisons add no check. (The choice only tells the
  compiler the conv's output layout, contiguous here either way; at run time the convs pick
  their backend as in eager.)
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config

from advmoe import MoENet

from .graph import exported_program, module_runner

INDUCTOR_CONFIGS = {"layout_optimization": False}


def export_aoti(model: MoENet, path: str | Path) -> Path:
    program = exported_program(model)
    # A CUDA build of torch on a machine without a GPU logs "No CUDA runtime is found" when the
    # compiler first loads torch.utils.cpp_extension: noise for a CPU package.
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)
    try:
        with fx_config.patch(backed_size_oblivious=True), torch.backends.nnpack.flags(enabled=False):
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=INDUCTOR_CONFIGS)
    finally:
        cpp_extension_log.setLevel(level)
    return Path(path)


def aoti_runner(path: str | Path):
    return module_runner(torch._inductor.aoti_load_package(str(path)))
