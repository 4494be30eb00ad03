"""Your own images: a folder of class folders, the layout torchvision's ImageFolder reads.

    ROOT/train/CLASS/*.jpg|png|...   training images; the validation split is carved out of them
    ROOT/test/CLASS/...              held-out images for the test split (ROOT/val/ when there is no
                                     test/; with neither, a fixed tenth of train is carved out)

Classes are train's sub-folders in sorted order, as ImageFolder numbers them. Images stay on disk:
each item is decoded when a DataLoader worker asks for it, converted to RGB (grey, palette and
RGBA images mix freely with RGB ones) and resized to the model's size, training images by a random
resized crop and a horizontal flip, the others by a resize and a centre crop (torchvision's
transforms, as its ImageNet recipe).

Bad data is named: a missing or empty folder, a class folder without images, a test split whose
classes differ from train's. An image that cannot be opened is refused (`bad_images="error"`) or
left out and counted (`"skip"`); one whose data turns out truncated when decoded is refused, or
replaced by the split's next image with a warning naming it.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
BAD_IMAGES = {"error": "refuse the data set, naming the image", "skip": "leave the image out, counted and logged"}
# Photos: the ImageNet statistics, which torchvision's pretrained models and timm use by default.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # evaluation resizes to size / 0.875 and crops the centre (224 from 256)
TEST_FRACTION = 0.1  # carved out of train when there is no test/ or val/ folder
TEST_SEED = 0  # that carving is the same for every run, whatever its seed


class FolderDataError(ValueError):
    """The folder is not a data set we can train on; the message names the file or folder to fix."""


@dataclass(frozen=True)
class Scan:
    """One split folder: its class names and (path, label) samples; `skipped` could not be opened."""

    folder: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]
    skipped: tuple[str, ...] = ()


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _opens(path: Path) -> bool:
    """Whether PIL recognises the file as an image (reads the header only, not the pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.size  # noqa: B018: the header parsed
        return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def class_names(folder: Path) -> tuple[str, ...]:
    """The class folders in `folder`, sorted: what ImageFolder numbers 0, 1, ..."""
    if not folder.is_dir():
        raise FolderDataError(f"{folder}: no such folder; put one folder of images per class in it ({folder}/CLASS/*.jpg)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = _images_in(folder)
        hint = f" ({len(loose)} images lie in it directly: move each into a folder named after its class)" if loose else ""
        raise FolderDataError(f"{folder}: no class folders; put one folder of images per class in it "
                              f"({folder}/CLASS/*.jpg){hint}")
    return tuple(classes)


def scan(folder: str, bad_images: str = "error") -> Scan:
    """The classes and images of one split folder (FOLDER/CLASS/...), each image's header checked;
    kept while no class folder changes (train and val read the same folder)."""
    if bad_images not in BAD_IMAGES:
        raise FolderDataError(f"bad_images={bad_images!r}: choose one of {', '.join(BAD_IMAGES)}")
    classes = class_names(Path(folder))
    changed = tuple((Path(folder) / c).stat().st_mtime_ns for c in classes)
    return _scan(folder, bad_images, classes, changed)


@functools.lru_cache(maxsize=16)
def _scan(folder: str, bad_images: str, classes: tuple[str, ...], changed: tuple[int, ...]) -> Scan:
    root = Path(folder)
    samples, skipped = [], []
    for label, name in enumerate(classes):
        images = _images_in(root / name)
        if not images:
            raise FolderDataError(f"{root / name}: a class folder with no images ({', '.join(EXTENSIONS)}); "
                                  "add its images or remove the folder")
        for path in images:
            if _opens(path):
                samples.append((str(path), label))
            else:
                skipped.append(str(path))
    if skipped and bad_images == "error":
        raise FolderDataError(f"{skipped[0]}: not an image PIL can open ({len(skipped)} such file(s) in {root}); "
                              "remove them, or leave them out with bad_images=\"skip\" (--bad-images skip)")
    if skipped:
        warnings.warn(f"{root}: left out {len(skipped)} file(s) that are not images PIL can open, e.g. {skipped[0]}",
                      stacklevel=2)
    return Scan(root, tuple(classes), tuple(samples), tuple(skipped))


def held_out_folder(root: Path) -> Path | None:
    """The folder of the test split: ROOT/test, else ROOT/val, else none (carved out of train)."""
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    return None


def same_classes(train: Path, test: Path) -> None:
    have, want = class_names(test), class_names(train)
    if have != want:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise FolderDataError(f"{test}: its classes differ from {train}'s"
                              + (f"; missing {missing}" if missing else "") + (f"; not in train {extra}" if extra else "")
                              + ": both need one folder per class, with the same names")


def transform(image_size: int, train: bool):
    """torchvision's transforms from a PIL image to a float [3, S, S] tensor in [0, 1]."""
    from torchvision.transforms import v2

    if train:
        resize = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        resize = [v2.Resize(round(image_size / CROP_FRACTION), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *resize, v2.ToDtype(torch.float32, scale=True)])


class FolderDataset(Dataset):
    """Images decoded from their files item by item: nothing but the file list stays in memory."""

    def __init__(self, samples, classes, image_size: int, train: bool, bad_images: str = "error"):
        self.samples = list(samples)
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.classes = tuple(classes)
        self.image_size, self.train, self.bad_images = image_size, train, bad_images
        self.transform = transform(image_size, train)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for tried in range(len(self.samples)):
            path, label = self.samples[(index + tried) % len(self.samples)]
            try:
                return self.transform(self.decode(path)), label
            except (OSError, ValueError) as e:
                if self.bad_images == "error":
                    raise FolderDataError(f"{path}: the image cannot be decoded ({e}); remove or replace it, or "
                                          "leave such images out with bad_images=\"skip\" (--bad-images skip)") from None
                warnings.warn(f"{path}: cannot be decoded ({e}); the next image of the split takes its place",
                              stacklevel=2)
        raise FolderDataError(f"no image of the split can be decoded (first: {self.samples[0][0]})")

    @staticmethod
    def decode(path: str):
        from PIL import Image

        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                # transparent pixels over white, as a viewer shows them, not over black
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, image).convert("RGB")
            return image.convert("RGB")  # decodes every pixel: truncated data fails here


def split_files(root: Path, split: str, val_size: int | float, seed: int, bad_images: str):
    """(scan of the folder the split's images come from, the samples of the split)."""
    from .data import split_indices

    test_folder = held_out_folder(root)
    if split == "test" and test_folder is not None:
        same_classes(root / "train", test_folder)
        test = scan(str(test_folder), bad_images)
        return test, list(test.samples)
    train = scan(str(root / "train"), bad_images)
    pool = list(train.samples)
    if test_folder is None:  # the test split: a fixed draw out of train, the same for every seed
        rest, carved = split_indices(len(pool), TEST_FRACTION, TEST_SEED)
        if split == "test":
            return train, [pool[i] for i in carved]
        pool = [pool[i] for i in rest]
    train_idx, val_idx = split_indices(len(pool), val_size, seed)
    return train, [pool[i] for i in (train_idx if split == "train" else val_idx)]


def root_of(data_dir) -> Path:
    if data_dir is None:
        raise FolderDataError("the folder data set needs --data-dir ROOT, the folder that holds train/CLASS/*.jpg")
    root = Path(os.fspath(data_dir)).expanduser()
    if not (root / "train").is_dir():
        inside = " (it has class folders: move them into ROOT/train/)" if root.is_dir() and any(
            p.is_dir() for p in root.iterdir()) else ""
        raise FolderDataError(f"{root}: no train/ folder; the layout is ROOT/train/CLASS/*.jpg, with ROOT/test/CLASS/ "
                              f"beside it or not{inside}")
    return root
