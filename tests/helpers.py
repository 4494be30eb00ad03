"""Helpers the tests import (`from helpers import small_model`): small models (a fraction of the
paper's width) that run fast on 2 cores, Fashion-MNIST-shaped idx files, the test server's settings.
Fixtures live in conftest.py."""
from __future__ import annotations

import copy
import functools
import gzip
import struct

import numpy as np
import torch

import advmoe
from advmoe.calibrate import balance_routing, calibrate_batchnorm
from advmoe.routers import ROUTERS as ROUTER_CHOICES

SMALL_WIDTH = 0.25
MOE_MODELS = advmoe.list_models(moe=True)
ALL_MODELS = advmoe.list_models()
ROUTERS = tuple(ROUTER_CHOICES)


def model_variants(names=ALL_MODELS):
    """(name, router) pairs: every dense model once, every MoE model with each router."""
    return [(n, r) for n in names for r in (ROUTERS if advmoe.is_moe_model(n) else (None,))]


def variant_id(value) -> str:
    return "dense" if value is None else str(value)


def small_model(name: str, router: str | None = None, **config) -> advmoe.MoENet:
    config.setdefault("width", SMALL_WIDTH)
    if router is not None:
        config["router"] = router
    return advmoe.create_model(name, **config)


@functools.lru_cache(maxsize=None)
def _calibrated(name: str, router: str | None, top_k: int, image_size: int, seed: int, num_experts: int) -> advmoe.MoENet:
    torch.manual_seed(seed)
    extra = {"top_k": top_k} if top_k > 1 else {}
    if router is not None:
        extra["num_experts"] = num_experts
    model = small_model(name, router, image_size=image_size, **extra)
    x = torch.rand(64, 3, image_size, image_size)
    calibrate_batchnorm(model, x)
    if router is not None:
        balance_routing(model, x)
    return model


def calibrated_model(name: str, router: str | None = None, top_k: int = 1, image_size: int = 32, seed: int = 0,
                     num_experts: int = 2):
    """A small model with realistic BatchNorm statistics and routers that split a random batch
    evenly (eval mode, masked execution); a fresh copy each call, so tests may change it."""
    return copy.deepcopy(_calibrated(name, router, top_k, image_size, seed, num_experts))


# -- tiny Fashion-MNIST-shaped data as idx files: training tests need no download nor the Debian
# package. 10 classes, each a fixed random pattern plus noise, so there is something to learn.
def fmnist_moe_checkpoint(folder):
    """A Fashion-MNIST-shaped MoE checkpoint in folder/best (untrained, calibrated, both experts in
    use) with a training eps of 0.1: what evaluations and the studies over them read."""
    torch.manual_seed(0)
    model = small_model("moe_resnet18", "shared", in_channels=1, image_size=28, width=0.0625, router_blocks=1,
                        router_width=4)
    x = torch.rand(32, 1, 28, 28)
    calibrate_batchnorm(model, x)
    balance_routing(model, x)
    return advmoe.save_checkpoint(model, folder / "best", config={"dataset": "fashion_mnist", "training": {"eps": 0.1}})


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion_like(folder, n_train=600, n_test=100, seed=0):
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(10, 28, 28))
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        images = np.clip(patterns[labels] * 0.7 + rng.integers(0, 77, size=(n, 28, 28)), 0, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


# -- the test server (conftest.py's `server` fixture): a real `bentoml serve` of a small model
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TOKEN = "test-token"
SERVER_ENV = {
    "ADVMOE_MAX_BATCH_SIZE": "16",
    "ADVMOE_MAX_BODY_BYTES": "200000",
    "ADVMOE_MAX_IMAGE_PIXELS": "1000000",
    "ADVMOE_PROBE_ENABLED": "1",
    "ADVMOE_PROBE_TOKEN": TOKEN,
    "ADVMOE_PROBE_MAX_STEPS": "5",
    "ADVMOE_PROBE_MAX_BATCH_SIZE": "4",
    "ADVMOE_PROBE_MAX_EPS": "0.1",
}


# -- a small folder data set of generated photos (ROOT/train/CLASS/*.png|jpg, ROOT/test/...): mixed
# sizes, file formats and modes (RGB, grey, RGBA, palette), each class a colour so there is something to learn.
FOLDER_CLASSES = ("cat", "dog", "fox")
# a run on it that takes seconds: a tiny MoE ResNet-18 at 32 x 32
FOLDER_RUN = dict(dataset="folder", image_size=32, model="moe_resnet18", width=0.0625, router_blocks=1, router_width=4,
                  eps=8 / 255, eval_steps=1, val_size=6, val_examples=6, batch_size=8, epochs=1, val_apgd_iterations=0)
_COLOURS = {"cat": (200, 60, 40), "dog": (40, 160, 60), "fox": (50, 70, 210)}


def write_image_folder(root, per_class: int = 12, test_per_class: int = 4, seed: int = 0, classes=FOLDER_CLASSES):
    """Writes the data set under root and returns root."""
    from pathlib import Path

    from PIL import Image

    root, rng = Path(root), np.random.default_rng(seed)
    modes = ("RGB", "L", "RGBA", "P")
    for split, n in (("train", per_class), ("test", test_per_class)):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(20, 72, size=2))
                colour = _COLOURS.get(name, (128, 128, 128))
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                image, mode = Image.fromarray(pixels), modes[i % len(modes)]
                image = image.convert(mode) if mode != "RGBA" else image.convert("RGBA")
                if mode in ("RGB", "L") and i % 2:
                    image.save(root / split / name / f"{i}.jpg", quality=90)
                else:
                    image.save(root / split / name / f"{i}.png")
    return root
