"""`advmoe eval CHECKPOINT`: the flags of `evaluation.robustness.evaluate_checkpoint`, one per
EvalSettings field. Under torchrun (`torchrun --nproc_per_node N -m cli eval ...`) the images are
sharded over the processes and rank 0 writes the one eval.json."""
from __future__ import annotations

import argparse

from evaluation.robustness import EvalSettings

from .flags import add_dataclass_flags, given_flags, number

HELP = ("robustness of a checkpoint: PGD, AutoAttack, route-fixed and router attacks, Square, sanity checks; "
        "writes eval.json (torchrun shards it)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--n-examples", type=int, default=1000, help="the first N images of the split (default 1000)")
    parser.add_argument("--draw-seed", type=int, help="take the split's images in an order drawn at random with this "
                        "seed (the same every run) instead of the split's own")
    parser.add_argument("--start", type=int, default=0, help="skip the first START images of that order: evaluate "
                        "images [START, START + N) (a large evaluation in parts)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="test (default), or val: the validation images the checkpoint's training held out, "
                             "to choose between checkpoints without looking at the test set")
    parser.add_argument("--eps", type=number, help="linf budget in [0, 1] pixels, e.g. 0.1 or 8/255 "
                                                   "(default: the checkpoint's training eps, else 8/255)")
    parser.add_argument("--dataset", help="must match the checkpoint's dataset (default: the checkpoint's)")
    parser.add_argument("--data-dir", help="where the dataset files are (see advmoe.data)")
    parser.add_argument("--out", help="where eval.json and eval.md go (default: the checkpoint directory)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; under torchrun, one GPU per rank")
    add_dataclass_flags(parser.add_argument_group("attacks and their settings"), EvalSettings, skip=("eps",))


def run(args: argparse.Namespace) -> int:
    import torch

    from evaluation.robustness import evaluate_checkpoint
    from evaluation.summary import summary

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = given_flags(args, EvalSettings, skip=("eps",))
    if settings.get("attacks") == ("all",):
        del settings["attacks"]  # the default: every attack
    document = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                                   n_examples=args.n_examples, out=args.out, eps=args.eps, device=args.device,
                                   split=args.split, draw_seed=args.draw_seed, start=args.start, **settings)
    if document is not None:  # rank 0 (or the only process)
        print(summary(document))
        print(f"wrote {args.out or args.checkpoint}/eval.json and eval.md")
    return 0
