"""`advmoe eval CHECKPOINT`: the flags of `training.evaluate.evaluate_checkpoint`."""
from __future__ import annotations

import argparse
from fractions import Fraction


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluate import ATTACKS, EvalSettings

    defaults = EvalSettings()
    parser.add_argument("checkpoint", help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--attacks", nargs="+", default=["all"], metavar="ATTACK",
                        help=f"any of {', '.join(ATTACKS)}, or all (default)")
    parser.add_argument("--n-examples", type=int, default=1000, help="the first N test images (default 1000)")
    parser.add_argument("--eps", help="linf budget in [0, 1] pixels, e.g. 0.1 or 8/255 "
                                      "(default: the checkpoint's training eps, else 8/255)")
    parser.add_argument("--dataset", help="must match the checkpoint's dataset (default: the checkpoint's)")
    parser.add_argument("--data-dir", help="where the dataset files are (see advmoe.data)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--pgd-steps", type=int, nargs="+", default=list(defaults.pgd_steps), metavar="K",
                        help="PGD-K through the straight-through router, one run per K (default 10 50)")
    parser.add_argument("--route-steps", type=int, default=defaults.route_steps,
                        help="PGD steps per forced route and of the router attack")
    parser.add_argument("--square-queries", type=int, default=defaults.square_queries,
                        help="Square's queries (5000 is AutoAttack's standard)")
    parser.add_argument("--sweep-examples", type=int, default=defaults.sweep_examples,
                        help="examples of the eps sweep of the sanity checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="where eval.json and eval.md go (default: the checkpoint directory)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")


def parse_eps(text: str | None) -> float | None:
    """'0.1', '8/255' -> float; anything else is a ValueError naming the flag."""
    if text is None:
        return None
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--eps {text!r} is not a number; give e.g. 0.1 or 8/255") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import ATTACKS, evaluate_checkpoint
    from .eval_summary import summary

    if args.threads:
        torch.set_num_threads(args.threads)
    attacks = tuple(ATTACKS) if args.attacks == ["all"] else tuple(args.attacks)
    document = evaluate_checkpoint(
        args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, n_examples=args.n_examples, out=args.out,
        eps=parse_eps(args.eps), attacks=attacks, batch_size=args.batch_size, pgd_steps=tuple(args.pgd_steps),
        route_steps=args.route_steps, square_queries=args.square_queries, sweep_examples=args.sweep_examples,
        seed=args.seed, device=args.device,
    )
    print(summary(document))
    print(f"wrote {args.out or args.checkpoint}/eval.json and eval.md")
    return 0
