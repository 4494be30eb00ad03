"""Image classification datasets that load from local files only.

Nothing here downloads: every loader reads the files the user already has and
raises :class:`DatasetNotFoundError` (saying what to put where) when they are
missing. Items are ``(image, label)`` with ``image`` a float32 ``[C, H, W]``
tensor in ``[0, 1]`` (unnormalized: the models normalize inside, using
``DatasetInfo.mean/std``) and ``label`` a python ``int``.

Splits: ``"train"`` and ``"val"`` partition the official training set with a
seeded permutation; ``"test"`` is the official test set.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "SPLITS",
    "augment",
    "get_dataset_info",
    "list_datasets",
    "load_dataset",
]

SPLITS = ("train", "val", "test")
AUGMENTATIONS = {
    "none": "no augmentation",
    "crop": "random crop from the image zero-padded by 4 pixels per side",
    "crop-flip": "random crop (padding 4) and horizontal flip with probability 1/2",
    "resized-crop-flip": "random resized crop and horizontal flip of each image as it is decoded (folder data sets)",
}
PER_IMAGE = "resized-crop-flip"  # done by the data set itself, not on the batch
FOLDER = "folder"  # your own images: ROOT/train/CLASS/*.jpg (image_folder.py)
FOLDER_IMAGE_SIZE = 224  # the folder data set's default, ImageNet's
MIN_IMAGE_SIZE = 16  # the smallest image_size the folder data set resizes to
CROP_PADDING = 4
PathLike = str | os.PathLike


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where we looked (we never download them)."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str  # as people write it: "CIFAR-10" (report titles)
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    files: str  # human description of the expected on-disk files
    default_val_size: int | float  # images (or a fraction) carved out of the official train set for "val"
    augmentation: str = "crop"  # the dataset's standard training augmentation (AUGMENTATIONS)


# Tiny ImageNet labels are indices into the sorted wnids (ImageFolder order).
_TINY_IMAGENET_WNIDS = tuple(
    " ".join(
        [
            "n01443537 n01629819 n01641577 n01644900 n01698640 n01742172 n01768244 n01770393",
            "n01774384 n01774750 n01784675 n01855672 n01882714 n01910747 n01917289 n01944390",
            "n01945685 n01950731 n01983481 n01984695 n02002724 n02056570 n02058221 n02074367",
            "n02085620 n02094433 n02099601 n02099712 n02106662 n02113799 n02123045 n02123394",
            "n02124075 n02125311 n02129165 n02132136 n02165456 n02190166 n02206856 n02226429",
            "n02231487 n02233338 n02236044 n02268443 n02279972 n02281406 n02321529 n02364673",
            "n02395406 n02403003 n02410509 n02415577 n02423022 n02437312 n02480495 n02481823",
            "n02486410 n02504458 n02509815 n02666196 n02669723 n02699494 n02730930 n02769748",
            "n02788148 n02791270 n02793495 n02795169 n02802426 n02808440 n02814533 n02814860",
            "n02815834 n02823428 n02837789 n02841315 n02843684 n02883205 n02892201 n02906734",
            "n02909870 n02917067 n02927161 n02948072 n02950826 n02963159 n02977058 n02988304",
            "n02999410 n03014705 n03026506 n03042490 n03085013 n03089624 n03100240 n03126707",
            "n03160309 n03179701 n03201208 n03250847 n03255030 n03355925 n03388043 n03393912",
            "n03400231 n03404251 n03424325 n03444034 n03447447 n03544143 n03584254 n03599486",
            "n03617480 n03637318 n03649909 n03662601 n03670208 n03706229 n03733131 n03763968",
            "n03770439 n03796401 n03804744 n03814639 n03837869 n03838899 n03854065 n03891332",
            "n03902125 n03930313 n03937543 n03970156 n03976657 n03977966 n03980874 n03983396",
            "n03992509 n04008634 n04023962 n04067472 n04070727 n04074963 n04099969 n04118538",
            "n04133789 n04146614 n04149813 n04179913 n04251144 n04254777 n04259630 n04265275",
            "n04275548 n04285008 n04311004 n04328186 n04356056 n04366367 n04371430 n04376876",
            "n04398044 n04399382 n04417672 n04456115 n04465501 n04486054 n04487081 n04501370",
            "n04507155 n04532106 n04532670 n04540053 n04560804 n04562935 n04596742 n04597913",
            "n06596364 n07579787 n07583066 n07614500 n07615774 n07695742 n07711569 n07715103",
            "n07720875 n07734744 n07747607 n07749582 n07753592 n07768694 n07871810 n07873807",
            "n07875152 n07920052 n09193705 n09246464 n09256479 n09332890 n09428293 n12267677",
        ]
    ).split()
)

_CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy
    bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock
    cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest
    fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard
    lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid
    otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum
    rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
    snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
    television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf
    woman worm""".split()
)

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            name="fashion_mnist",
            title="Fashion-MNIST",
            num_classes=10,
            in_channels=1,
            image_size=28,
            mean=(0.2860,),
            std=(0.3530,),
            classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            files="{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
            "(default: /usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist)",
            default_val_size=5000,
            # Mirroring keeps every class (clothes are near-symmetric, a mirrored shoe is the
            # same shoe), unlike digits; docs/method.md.
            augmentation="crop-flip",
        ),
        DatasetInfo(
            name="cifar10",
            title="CIFAR-10",
            num_classes=10,
            in_channels=3,
            image_size=32,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            classes=("airplane", "automobile", "bird", "cat", "deer",
                     "dog", "frog", "horse", "ship", "truck"),
            files="cifar-10-batches-py/{data_batch_1..5,test_batch} "
            "(the 'python version' from the CIFAR-10 site)",
            default_val_size=5000,
            augmentation="crop-flip",  # the reference code's
        ),
        DatasetInfo(
            name="cifar100",
            title="CIFAR-100",
            num_classes=100,
            in_channels=3,
            image_size=32,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            classes=_CIFAR100_CLASSES,
            files="cifar-100-python/{train,test} (the 'python version' from the CIFAR-100 site)",
            default_val_size=5000,
            augmentation="crop-flip",
        ),
        DatasetInfo(
            name="svhn",
            title="SVHN",
            num_classes=10,
            in_channels=3,
            image_size=32,
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
            classes=tuple(str(d) for d in range(10)),
            files="{train,test}_32x32.mat (SVHN format 2, cropped digits) in DIR or DIR/svhn",
            default_val_size=5000,
            augmentation="crop",  # digits: a mirrored 2, 3 or 7 is no digit
        ),
        DatasetInfo(
            name="tiny_imagenet",
            title="Tiny ImageNet",
            num_classes=200,
            in_channels=3,
            image_size=64,
            mean=(0.4802, 0.4481, 0.3975),
            std=(0.2302, 0.2265, 0.2262),
            classes=_TINY_IMAGENET_WNIDS,
            files="tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, "
            "val/images/*.JPEG, val/val_annotations.txt}",
            default_val_size=10000,
            augmentation="crop-flip",
        ),
    ]
}


def list_datasets() -> list[str]:
    return [*DATASETS, FOLDER]


def get_dataset_info(name: str, data_dir: PathLike | None = None, image_size: int | None = None) -> DatasetInfo:
    """What a data set is: classes, image shape, normalisation. The folder data set's come from its
    folder (`data_dir`) and `image_size` (default 224); a named data set has its own size."""
    if name == FOLDER:
        return _folder_info(data_dir, image_size)
    try:
        info = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}") from None
    if image_size not in (None, info.image_size):
        raise ValueError(f"{name} images are {info.image_size}x{info.image_size}; image_size={image_size} is a setting "
                         f"of the {FOLDER} data set (your own images)")
    return info


def _folder_info(data_dir: PathLike | None, image_size: int | None) -> DatasetInfo:
    from .image_folder import MEAN, STD, class_names, root_of

    root = root_of(data_dir)
    size = image_size or FOLDER_IMAGE_SIZE
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size={size}: give {MIN_IMAGE_SIZE} pixels or more")
    classes = class_names(root / "train")
    return DatasetInfo(name=FOLDER, title=root.name, num_classes=len(classes), in_channels=3, image_size=size,
                       mean=MEAN, std=STD, classes=classes, files=f"{root}/train/CLASS/*.jpg|png",
                       default_val_size=0.1, augmentation=PER_IMAGE)


# --------------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, kind: str, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """Standard training augmentation of a batch [B, C, H, W], one draw per image, on tensors
    (no PIL round trip): torchvision's RandomCrop(size, padding) with zero fill, then for
    "crop-flip" RandomHorizontalFlip. The draws come from `generator` (a CPU generator; the
    batch may live on any device), so a seeded generator repeats them exactly."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if kind in ("none", PER_IMAGE) or len(x) == 0:  # PER_IMAGE: the data set augmented each image
        return x
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [B, H] rows of the padded image
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if kind == "crop-flip":
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


# --------------------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """A whole split kept in memory as uint8 ``[N, C, H, W]``; converted per item (cheap)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(targets)
        self.images = images
        self.targets = targets
        self.classes = tuple(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255), int(self.targets[index])


class ImageFileDataset(Dataset):
    """Images decoded lazily from files (Tiny ImageNet is too big to keep decoded)."""

    def __init__(self, samples: list[tuple[Path, int]], classes: Sequence[str]):
        self.samples = samples
        self.targets = torch.tensor([label for _, label in samples], dtype=torch.long)
        self.classes = tuple(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            array = np.array(img.convert("RGB"), dtype=np.uint8)  # copy: writable; some are grayscale
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255), label


class SplitSubset(Subset):
    """A ``Subset`` that keeps ``targets`` and ``classes`` of its parent."""

    @property
    def targets(self) -> torch.Tensor:
        return self.dataset.targets[self.indices]

    @property
    def classes(self) -> tuple[str, ...]:
        return self.dataset.classes


# --------------------------------------------------------------------------- helpers


def _not_found(name: str, expected: str, looked: Sequence[Path], hint: str) -> DatasetNotFoundError:
    where = ", ".join(str(p) for p in looked)
    return DatasetNotFoundError(f"{name}: expected {expected}; looked in {where}. {hint}")


def _require_dir(name: str, data_dir: PathLike | None, hint: str) -> Path:
    if data_dir is None:  # only Fashion-MNIST has a standard system location
        raise DatasetNotFoundError(
            f"{name}: --data-dir is required (no default location); expected {DATASETS[name].files}. {hint}"
        )
    return Path(data_dir).expanduser()


def _first_with(candidates: Sequence[Path], filenames: Sequence[str]) -> Path | None:
    for folder in candidates:
        if all((folder / f).is_file() for f in filenames):
            return folder
    return None


# --------------------------------------------------------------------------- fashion-mnist

FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_UBYTE = 0x08


def read_idx(path: PathLike, ndim: int) -> np.ndarray:
    """Read a uint8 idx file (the MNIST format, optionally gzipped)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # bad gzip header / truncated stream
        raise ValueError(f"corrupt idx file {path}: {e}") from e
    # Header: two zero bytes, dtype code, number of dims, then one big-endian int32 per dim.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise ValueError(
            f"corrupt idx file {path}: bad magic number {raw[:4].hex() or '(empty)'}, "
            f"expected 000008{ndim:02x} (uint8, {ndim} dims)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt idx file {path}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(
            f"corrupt idx file {path}: header says shape {shape} ({int(np.prod(shape))} bytes) "
            f"but {len(raw) - header} data bytes follow"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_fashion_mnist(data_dir: PathLike | None, train: bool) -> Dataset:
    prefix = "train" if train else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    if data_dir is None:
        candidates = [FASHION_MNIST_DEFAULT_DIR]
    else:
        root = Path(data_dir).expanduser()
        candidates = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]

    for folder in candidates:
        for suffix in (".gz", ""):
            files = [folder / (s + suffix) for s in stems]
            if all(f.is_file() for f in files):
                images, labels = read_idx(files[0], ndim=3), read_idx(files[1], ndim=1)
                if len(images) != len(labels) or images.shape[1:] != (28, 28):
                    raise ValueError(
                        f"corrupt fashion_mnist files in {folder}: images {images.shape}, labels {labels.shape}"
                    )
                if labels.size and labels.max() >= 10:
                    raise ValueError(f"corrupt fashion_mnist labels in {files[1]}: label {labels.max()} >= 10")
                return TensorImageDataset(
                    torch.from_numpy(images.copy()).unsqueeze(1),
                    torch.from_numpy(labels.astype(np.int64)),
                    DATASETS["fashion_mnist"].classes,
                )
    raise _not_found(
        "fashion_mnist",
        " and ".join(f"{s}[.gz]" for s in stems),
        candidates,
        "apt-get install dataset-fashion-mnist, or pass --data-dir DIR containing those files.",
    )


# --------------------------------------------------------------------------- cifar


def _load_cifar(name: str, data_dir: PathLike | None, train: bool) -> Dataset:
    # torchvision's exact layout, parsed here (like torchvision does) so fresh copies need
    # no md5 pass and a missing file gives our error instead of "Dataset not found or corrupted".
    is10 = name == "cifar10"
    folder_name = "cifar-10-batches-py" if is10 else "cifar-100-python"
    site = "CIFAR-10" if is10 else "CIFAR-100"
    hint = f"Pass --data-dir DIR containing {folder_name}/ (the python version from the {site} site)."
    root = _require_dir(name, data_dir, hint)
    if is10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        files = ["train" if train else "test"]
    label_key = "labels" if is10 else "fine_labels"

    folder = _first_with([root / folder_name, root], files)
    if folder is None:
        raise _not_found(name, f"{folder_name}/{{{','.join(files)}}}", [root / folder_name, root], hint)

    images, labels = [], []
    for f in files:
        path = folder / f
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            target = np.asarray(entry[label_key], dtype=np.int64)
        except Exception as e:  # unpickling a damaged file can raise almost anything
            raise ValueError(f"corrupt {name} file {path}: {type(e).__name__}: {e}") from e
        if len(data) != len(target):
            raise ValueError(f"corrupt {name} file {path}: {len(data)} images but {len(target)} labels")
        images.append(data)
        labels.append(target)
    return TensorImageDataset(
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(np.concatenate(labels)),
        DATASETS[name].classes,
    )


# --------------------------------------------------------------------------- svhn


def _load_svhn(data_dir: PathLike | None, train: bool) -> Dataset:
    hint = "Pass --data-dir DIR containing train_32x32.mat and test_32x32.mat (SVHN format 2)."
    root = _require_dir("svhn", data_dir, hint)
    filename = "train_32x32.mat" if train else "test_32x32.mat"
    candidates = [root, root / "svhn"]
    folder = _first_with(candidates, [filename])
    if folder is None:
        raise _not_found("svhn", filename, candidates, hint)
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError("reading SVHN .mat files needs scipy: pip install scipy") from e

    path = folder / filename
    try:
        mat = loadmat(path)
        x, y = mat["X"], mat["y"]
    except Exception as e:
        raise ValueError(f"corrupt svhn file {path}: {type(e).__name__}: {e}") from e
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.size:
        raise ValueError(f"corrupt svhn file {path}: X has shape {x.shape}, y has {y.size} labels")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8))  # HWCN -> NCHW
    labels = torch.from_numpy(y.reshape(-1).astype(np.int64) % 10)  # SVHN stores digit 0 as 10
    return TensorImageDataset(images, labels, DATASETS["svhn"].classes)


# --------------------------------------------------------------------------- tiny imagenet


def _load_tiny_imagenet(data_dir: PathLike | None, train: bool) -> Dataset:
    """Tiny ImageNet-200. ``train=False`` gives the official ``val/`` folder: the test labels
    are not public, so ``val/`` serves as our "test" split (and "val" is carved from ``train/``)."""
    hint = "Pass --data-dir DIR containing tiny-imagenet-200/ (unzipped tiny-imagenet-200.zip)."
    base = _require_dir("tiny_imagenet", data_dir, hint)
    candidates = [base / "tiny-imagenet-200", base]
    needed = ["wnids.txt"] if train else ["wnids.txt", "val/val_annotations.txt"]
    root = _first_with(candidates, needed)
    if root is None or not (root / ("train" if train else "val/images")).is_dir():
        expected = "wnids.txt, train/<wnid>/images/*.JPEG" if train else (
            "wnids.txt, val/images/*.JPEG, val/val_annotations.txt"
        )
        raise _not_found("tiny_imagenet", f"tiny-imagenet-200/{{{expected}}}", candidates, hint)

    index = {wnid: i for i, wnid in enumerate(_TINY_IMAGENET_WNIDS)}
    wnids = (root / "wnids.txt").read_text().split()
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise ValueError(f"{root / 'wnids.txt'} lists wnids that are not Tiny ImageNet-200 classes: {unknown[:5]}")

    samples: list[tuple[Path, int]] = []
    if train:
        for wnid in sorted(wnids):
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise _not_found("tiny_imagenet", f"train/{wnid}/images/*.JPEG", [folder], hint)
            samples += [(p, index[wnid]) for p in sorted(folder.glob("*.JPEG"))]
    else:
        for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
            if line.strip():
                filename, wnid = line.split("\t")[:2]
                if wnid not in index:
                    raise ValueError(f"{root / 'val/val_annotations.txt'}: unknown wnid {wnid!r}")
                samples.append((root / "val" / "images" / filename, index[wnid]))
        missing = [p for p, _ in samples if not p.is_file()]
        if missing:
            raise _not_found("tiny_imagenet", f"{len(missing)} images listed in val_annotations.txt",
                             [missing[0].parent], hint)
    return ImageFileDataset(samples, _TINY_IMAGENET_WNIDS)


_LOADERS: dict[str, Callable[[PathLike | None, bool], Dataset]] = {
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": lambda d, train: _load_cifar("cifar10", d, train),
    "cifar100": lambda d, train: _load_cifar("cifar100", d, train),
    "svhn": _load_svhn,
    "tiny_imagenet": _load_tiny_imagenet,
}


# --------------------------------------------------------------------------- entry point


def split_indices(n: int, val_size: int | float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded (train, val) partition of ``range(n)``; each returned sorted for locality."""
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"val_size as a fraction must be in [0, 1), got {val_size}")
        n_val = round(val_size * n)
    else:
        n_val = int(val_size)
    if not 0 <= n_val < n:
        raise ValueError(f"val_size={val_size} must leave at least one of the {n} training images for train")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def load_dataset(
    name: str,
    split: str,
    data_dir: PathLike | None = None,
    val_size: int | float | None = None,
    seed: int = 0,
    image_size: int | None = None,
    augment: str | None = None,
    bad_images: str = "error",
) -> Dataset:
    """Load ``split`` ("train", "val" or "test") of dataset ``name`` from local files.

    "train" and "val" are disjoint and together cover the official training set; "val" has
    ``val_size`` images (an int count or a float fraction; default
    ``DatasetInfo.default_val_size``) picked by a permutation seeded with ``seed``.
    "test" is the official test set; for Tiny ImageNet that is the official ``val/`` folder,
    since its test labels are not public.

    The folder data set (name "folder", `data_dir` the folder: image_folder.py) streams its images
    from disk at `image_size`; its train split gets a random resized crop and flip when `augment`
    is "resized-crop-flip" (its default), and `bad_images` says what an unreadable image does.

    Raises DatasetNotFoundError when files are missing (nothing is ever downloaded) and
    ValueError for an unknown name/split or a corrupt file.
    """
    info = get_dataset_info(name, data_dir, image_size)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if info.name == FOLDER:
        from .image_folder import FolderDataset, root_of, split_files

        scanned, samples = split_files(root_of(data_dir), split, info.default_val_size if val_size is None else val_size,
                                       seed, bad_images)
        train = split == "train" and (augment or info.augmentation) == PER_IMAGE
        return FolderDataset(samples, scanned.classes, info.image_size, train, bad_images)
    if augment == PER_IMAGE:
        raise ValueError(f"augment={PER_IMAGE} is the folder data set's; {name} augments batches (crop, crop-flip)")
    full = _LOADERS[info.name](data_dir, split != "test")
    if split == "test":
        return full
    train_idx, val_idx = split_indices(
        len(full), info.default_val_size if val_size is None else val_size, seed
    )
    return SplitSubset(full, train_idx if split == "train" else val_idx)
