"""`advmoe export CHECKPOINT --out DIR`: the flags of `export.api.export_checkpoint`, one per
ExportSettings field."""
from __future__ import annotations

import argparse

from export.api import ExportSettings

from .flags import add_dataclass_flags, given_flags

HELP = "export a checkpoint to ONNX, torch.export, Triton and BentoML"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--out", required=True, help="output directory (must not exist, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    add_dataclass_flags(parser, ExportSettings, names={"formats": "--format"})


def run(args: argparse.Namespace) -> int:
    from export.api import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, force=args.force, **given_flags(args, ExportSettings))
    print(f"exported to {result.out}: {', '.join(str(f) for f in result.files)}")
    if result.bento_tag:
        print(f"BentoML model: {result.bento_tag}")
    return 0
