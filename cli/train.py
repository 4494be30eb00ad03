"""`advmoe train`: a preset, a TOML config and flags (every TrainConfig field) resolve into one config."""
from __future__ import annotations

import argparse

from training.config import TrainConfig, list_presets, resolve

from .flags import add_dataclass_flags, given_flags

HELP = "train a model (AdvMoE and its baselines); see --preset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help=f"start from a preset: {', '.join(list_presets())}")
    parser.add_argument("--config", help="a TOML file of settings (applied after the preset)")
    parser.add_argument("--out", required=True, help="run directory (new, or an interrupted run with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    parser.add_argument("--max-steps", type=int, help="cap the steps per epoch (smoke tests)")
    parser.add_argument("--test-examples", type=int, default=2000, help="test examples for the final evaluation")
    add_dataclass_flags(parser.add_argument_group("settings (override the preset and the config file)"), TrainConfig)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from training.trainer import train

    cfg = resolve(args.preset, args.config, **given_flags(args, TrainConfig))
    result = train(cfg, args.out, resume=args.resume, max_steps=args.max_steps, test_examples=args.test_examples)
    if dist.is_initialized():  # torchrun's group, which the run joined
        dist.destroy_process_group()
    print(f"run directory: {result.out}; best checkpoint: {result.best}")
    return 0
