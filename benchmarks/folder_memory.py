"""Memory of training on a folder data set as the folder grows: the same training steps on folders
of generated images of each size given, each in a fresh process, side by side in one run.

    advmoe bench folder-memory --images 2000 20000 --report reports/folder_memory.md

The images are streamed from disk, so only the list of files should grow with the folder: the
training process's peak resident memory, and its DataLoader workers', should stay flat. Printed:
both peaks per folder size and their ratios to the smallest folder's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from advmoe.io import atomic_write_text

CLASSES = 10
STEPS = 20
RUN = dict(dataset="folder", image_size=64, model="moe_resnet18", width=0.125, router_blocks=1, router_width=8,
           eps=8 / 255, eval_steps=1, val_size=64, val_examples=64, batch_size=32, epochs=1, workers=2,
           val_apgd_iterations=0)


def write_folder(root: Path, images: int, seed: int = 0) -> Path:
    """`images` small JPEG photos (random sizes, a colour per class) in root/train/CLASS/, and a few in test/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (CLASSES, 3))
    for split, n in (("train", images), ("test", 10 * CLASSES)):
        for i in range(n):
            label = i % CLASSES
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(48, 96, 2))
            pixels = np.clip(colours[label] + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=85)
    return root


def child(root: str) -> None:
    """Train STEPS steps on the folder and print the peak resident memory (MiB) of this process and
    of its largest worker."""
    from training import trainer
    from training.config import resolve

    cfg = resolve(data_dir=root, **RUN)
    trainer.train(cfg, Path(root) / "run", log=lambda *a: None, max_steps=STEPS, test_examples=32)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"main_mib": own, "worker_mib": workers}))


def measure(images: list[int]) -> list[dict]:
    rows = []
    for n in images:
        with tempfile.TemporaryDirectory(prefix="advmoe-folder-") as scratch:
            root = write_folder(Path(scratch), n)
            done = subprocess.run([sys.executable, "-m", "benchmarks.folder_memory", "--child", str(root)],
                                  capture_output=True, text=True, check=True)
            rows.append({"images": n, **json.loads(done.stdout.strip().splitlines()[-1])})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advmoe bench folder-memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000], help="training images per folder")
    parser.add_argument("--report", help="also write the table to this Markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    least = STEPS * RUN["batch_size"] + RUN["val_size"]  # every folder trains the same STEPS steps
    if min(args.images) < least:
        parser.error(f"--images: give {least} or more per folder, so that each trains {STEPS} full steps")
    rows = measure(sorted(args.images))
    command = "advmoe bench folder-memory --images " + " ".join(map(str, args.images))
    lines = [f"# Memory of training on a folder data set\n\nProduced by `{command}` (benchmarks/folder_memory.py): "
             f"{STEPS} training steps of {RUN['batch_size']} images at {RUN['image_size']}x{RUN['image_size']}, "
             f"{RUN['workers']} DataLoader workers, a fresh process per folder, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs.\n",
             "| training images | peak RSS, training process (MiB) | ratio | peak RSS, largest worker (MiB) | ratio |",
             "|---|---|---|---|---|"]
    first = rows[0]
    lines += [f"| {r['images']:,} | {r['main_mib']:.0f} | {r['main_mib'] / first['main_mib']:.2f}x "
              f"| {r['worker_mib']:.0f} | {r['worker_mib'] / first['worker_mib']:.2f}x |" for r in rows]
    print("\n".join(lines))
    if args.report:
        atomic_write_text(args.report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
