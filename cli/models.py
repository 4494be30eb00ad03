"""`advmoe models [PATTERN]`: the registered models with their parameters and MACs."""
from __future__ import annotations

import argparse

from advmoe.models import ModelConfig
from advmoe.models.base import STEMS

HELP = "list the registered models with their parameters and MACs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="glob on model names, e.g. 'moe_*'")
    parser.add_argument("--image-size", type=int, default=ModelConfig.image_size,
                        help="input height and width (default: %(default)s)")
    parser.add_argument("--stem", choices=STEMS, default="auto",
                        help="the first layers: " + "; ".join(f"{k}: {v}" for k, v in STEMS.items()))


def run(args: argparse.Namespace) -> int:
    from advmoe import count_macs, create_model, list_models

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no registered model matches {args.pattern!r}; try `advmoe models`")
    print(f"| model | stem | params (M) | MACs per {args.image_size}x{args.image_size} image (G) |\n|---|---|---|---|")
    for name in names:
        model = create_model(name, image_size=args.image_size, stem=args.stem)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        macs = count_macs(model, (3, args.image_size, args.image_size)) / 1e9
        print(f"| {name} | {model.stem_kind} | {params:.2f} | {macs:.3f} |")
    return 0
