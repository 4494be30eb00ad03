"""Tests for advmoe.data on tiny fake copies of each on-disk format (plus the real
Debian Fashion-MNIST files when installed)."""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from advmoe.data import (
    AUGMENTATIONS,
    DATASETS,
    DatasetNotFoundError,
    augment,
    get_dataset_info,
    list_datasets,
    load_dataset,
    read_idx,
)

N_TRAIN, N_TEST, VAL = 20, 6, 5
rng = np.random.default_rng(0)


@dataclass
class Fake:
    name: str
    data_dir: Path
    n_train: int
    n_test: int
    first_test: tuple[torch.Tensor, int]  # expected (image, label) of test item 0
    atol: float = 0.0  # JPEG is lossy


# --------------------------------------------------------------------------- fake files


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fashion_mnist(folder: Path, compress: bool = True) -> Fake:
    suffix = ".gz" if compress else ""
    parts = {}
    for prefix, n in [("train", N_TRAIN), ("t10k", N_TEST)]:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        parts[prefix] = images, labels
    images, labels = parts["t10k"]
    first = (torch.from_numpy(images[0]).float().unsqueeze(0) / 255, int(labels[0]))
    return Fake("fashion_mnist", folder, N_TRAIN, N_TEST, first)


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar(root: Path, name: str) -> Fake:
    num_classes = DATASETS[name].num_classes
    key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n: int) -> dict:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # rows are R(1024) G(1024) B(1024)
        labels = rng.integers(0, num_classes, n).tolist()
        entry = {"batch_label": "fake", "data": data, key: labels, "filenames": [f"{i}.png" for i in range(n)]}
        if name == "cifar100":
            entry["coarse_labels"] = [label // 5 for label in labels]
        return entry

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        for i in range(1, 6):
            _pickle(folder / f"data_batch_{i}", batch(N_TRAIN // 5))
        test = batch(N_TEST)
        _pickle(folder / "test_batch", test)
        _pickle(folder / "batches.meta", {"label_names": list(DATASETS[name].classes)})
    else:
        folder = root / "cifar-100-python"
        _pickle(folder / "train", batch(N_TRAIN))
        test = batch(N_TEST)
        _pickle(folder / "test", test)
        _pickle(folder / "meta", {"fine_label_names": list(DATASETS[name].classes)})
    first = (torch.from_numpy(test["data"][0].reshape(3, 32, 32)).float() / 255, test[key][0])
    return Fake(name, root, N_TRAIN, N_TEST, first)


def make_svhn(root: Path) -> Fake:
    from scipy.io import savemat

    (root / "svhn").mkdir()
    for split, n in [("train", N_TRAIN), ("test", N_TEST)]:
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1), dtype=np.uint8)
        y[0] = 10  # SVHN's label for digit 0
        savemat(root / "svhn" / f"{split}_32x32.mat", {"X": x, "y": y})
    first = (torch.from_numpy(x[..., 0]).permute(2, 0, 1).float() / 255, 0)
    return Fake("svhn", root, N_TRAIN, N_TEST, first)


TINY_WNIDS = [DATASETS["tiny_imagenet"].classes[i] for i in (199, 0, 57)]  # wnids.txt is unsorted


def make_tiny_imagenet(root: Path) -> Fake:
    from PIL import Image

    base = root / "tiny-imagenet-200"
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    colors = {wnid: (40 * i + 20, 200 - 50 * i, 128) for i, wnid in enumerate(TINY_WNIDS)}
    n_per_class = N_TRAIN // 4  # 5 per class -> 15 train images
    for wnid in TINY_WNIDS:
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for j in range(n_per_class):
            img = Image.new("RGB", (64, 64), colors[wnid])
            if j == 0:
                img = img.convert("L")  # real Tiny ImageNet has some grayscale JPEGs
            img.save(folder / f"{wnid}_{j}.JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for j, wnid in enumerate(TINY_WNIDS * 2):
        Image.new("RGB", (64, 64), colors[wnid]).save(base / "val" / "images" / f"val_{j}.JPEG")
        lines.append(f"val_{j}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    wnid = TINY_WNIDS[0]
    first = (torch.tensor(colors[wnid]).float().div(255).view(3, 1, 1).expand(3, 64, 64),
             DATASETS["tiny_imagenet"].classes.index(wnid))
    return Fake("tiny_imagenet", root, n_per_class * len(TINY_WNIDS), len(lines), first, atol=3 / 255)


MAKERS = {
    "fashion_mnist": make_fashion_mnist,
    "cifar10": lambda root: make_cifar(root, "cifar10"),
    "cifar100": lambda root: make_cifar(root, "cifar100"),
    "svhn": make_svhn,
    "tiny_imagenet": make_tiny_imagenet,
}


@pytest.fixture(params=list(MAKERS))
def fake(request, tmp_path) -> Fake:
    return MAKERS[request.param](tmp_path)


# --------------------------------------------------------------------------- registry


def test_registry_is_consistent():
    assert list_datasets() == ["fashion_mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet", "folder"]
    for name in list_datasets()[:-1]:  # the folder data set's info is its folder's (tests/core/test_image_folder.py)
        info = get_dataset_info(name)
        assert info.name == name
        assert len(info.classes) == len(set(info.classes)) == info.num_classes
        assert len(info.mean) == len(info.std) == info.in_channels
    fm = get_dataset_info("fashion_mnist")
    assert (fm.image_size, fm.in_channels, fm.mean, fm.std) == (28, 1, (0.2860,), (0.3530,))
    assert fm.classes[0] == "T-shirt/top" and fm.classes[9] == "Ankle boot"
    assert get_dataset_info("tiny_imagenet").image_size == 64


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="cifar10.*tiny_imagenet"):
        get_dataset_info("imagenet")
    with pytest.raises(ValueError, match="known datasets"):
        load_dataset("mnist", "train")


def test_unknown_split(fake):
    with pytest.raises(ValueError, match="train, val, test"):
        load_dataset(fake.name, "validation", fake.data_dir)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_items_shape_dtype_range(fake, split):
    info = DATASETS[fake.name]
    ds = load_dataset(fake.name, split, fake.data_dir, val_size=VAL)
    expected_len = {"train": fake.n_train - VAL, "val": VAL, "test": fake.n_test}[split]
    assert len(ds) == expected_len
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (info.in_channels, info.image_size, info.image_size)
        assert image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert type(label) is int and 0 <= label < info.num_classes
    assert ds.classes == info.classes
    assert [ds[i][1] for i in range(len(ds))] == ds.targets.tolist()


def test_first_test_item_matches_source(fake):
    image, label = load_dataset(fake.name, "test", fake.data_dir)[0]
    expected_image, expected_label = fake.first_test
    assert label == expected_label
    torch.testing.assert_close(image, expected_image, atol=fake.atol, rtol=0)


def test_tiny_imagenet_grayscale_becomes_rgb(tmp_path):
    fake = make_tiny_imagenet(tmp_path)
    full = load_dataset("tiny_imagenet", "train", fake.data_dir, val_size=0)
    gray = [i for i, (path, _) in enumerate(full.dataset.samples) if path.stem.endswith("_0")]
    assert len(gray) == len(TINY_WNIDS)
    image, _ = full.dataset[gray[0]]
    assert image.shape == (3, 64, 64)
    torch.testing.assert_close(image[0], image[1])
    # data_dir may also be the tiny-imagenet-200 folder itself
    assert len(load_dataset("tiny_imagenet", "test", tmp_path / "tiny-imagenet-200")) == fake.n_test


@pytest.mark.parametrize("subdir", ["", "FashionMNIST/raw", "fashion-mnist"])
@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_layouts(tmp_path, subdir, compress):
    fake = make_fashion_mnist(tmp_path / subdir, compress)
    image, label = load_dataset("fashion_mnist", "test", tmp_path)[0]
    assert label == fake.first_test[1]
    torch.testing.assert_close(image, fake.first_test[0], atol=0, rtol=0)


# --------------------------------------------------------------------------- splits


def test_train_val_partition_official_train_set(fake):
    train = load_dataset(fake.name, "train", fake.data_dir, val_size=VAL, seed=3)
    val = load_dataset(fake.name, "val", fake.data_dir, val_size=VAL, seed=3)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(fake.n_train))
    assert len(train.dataset) == fake.n_train


@pytest.mark.parametrize("val_size, expected", [(VAL, VAL), (0.25, 5), (0.5, 10)])
def test_val_size_count_or_fraction(tmp_path, val_size, expected):
    fake = make_fashion_mnist(tmp_path)
    assert len(load_dataset("fashion_mnist", "val", fake.data_dir, val_size=val_size)) == expected


def test_val_split_is_seeded(tmp_path):
    fake = make_fashion_mnist(tmp_path)

    def val_indices(seed):
        return load_dataset("fashion_mnist", "val", fake.data_dir, val_size=8, seed=seed).indices

    assert val_indices(0) == val_indices(0)
    assert val_indices(0) != val_indices(1)


@pytest.mark.parametrize("val_size", [N_TRAIN, 10**6, 1.0, -1])
def test_val_size_out_of_range(tmp_path, val_size):
    fake = make_fashion_mnist(tmp_path)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("fashion_mnist", "train", fake.data_dir, val_size=val_size)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name, split, expected",
    [
        ("fashion_mnist", "train", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "FashionMNIST/raw",
                                    "apt-get install dataset-fashion-mnist", "--data-dir"]),
        ("fashion_mnist", "test", ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        ("cifar10", "train", ["cifar-10-batches-py", "data_batch_1", "--data-dir"]),
        ("cifar10", "test", ["cifar-10-batches-py", "test_batch"]),
        ("cifar100", "val", ["cifar-100-python", "train"]),
        ("svhn", "train", ["train_32x32.mat", "svhn"]),
        ("svhn", "test", ["test_32x32.mat"]),
        ("tiny_imagenet", "train", ["tiny-imagenet-200", "wnids.txt", "train/<wnid>/images"]),
        ("tiny_imagenet", "test", ["tiny-imagenet-200", "val_annotations.txt", "val/images"]),
    ],
)
def test_missing_files_error_names_expected_files(tmp_path, name, split, expected):
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset(name, split, tmp_path)
    message = str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    assert message.startswith(name) and str(tmp_path) in message
    for text in expected:
        assert text in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "tiny_imagenet"])
def test_data_dir_required(name):
    with pytest.raises(DatasetNotFoundError, match="--data-dir is required"):
        load_dataset(name, "test")


def _corrupt_bad_magic(path: Path) -> None:
    write_idx(path, np.zeros((2, 28, 28), np.uint8))
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[2] = 0x0D  # float32 dtype code
    path.write_bytes(gzip.compress(bytes(raw)))


def _corrupt_truncated(path: Path) -> None:
    write_idx(path, np.zeros((2, 28, 28), np.uint8))
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))


def _corrupt_not_gzip(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"<html>404 not found</html>")


@pytest.mark.parametrize("corrupt", [_corrupt_bad_magic, _corrupt_truncated, _corrupt_not_gzip])
def test_corrupt_idx_file(tmp_path, corrupt):
    make_fashion_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    corrupt(path)
    with pytest.raises(ValueError, match=f"corrupt idx file {path}"):
        load_dataset("fashion_mnist", "test", tmp_path)


def test_corrupt_cifar_pickle(tmp_path):
    make_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt cifar10 file"):
        load_dataset("cifar10", "test", tmp_path)


def test_read_idx_roundtrip(tmp_path):
    labels = np.arange(7, dtype=np.uint8)
    write_idx(tmp_path / "labels", labels, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels", ndim=1), labels)


# --------------------------------------------------------------------------- real data

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_debian_fashion_mnist():
    train = load_dataset("fashion_mnist", "train")
    val = load_dataset("fashion_mnist", "val")
    test = load_dataset("fashion_mnist", "test")
    assert len(train) + len(val) == 60000 and len(val) == 5000
    assert len(test) == 10000

    with gzip.open(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        first_label = int(np.frombuffer(f.read(), dtype=np.uint8, offset=8)[0])
    image, label = test[0]
    assert label == first_label
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0


# --------------------------------------------------------------------------- augmentation


def test_every_dataset_names_a_standard_augmentation_and_digits_are_not_flipped():
    assert all(info.augmentation in AUGMENTATIONS for info in DATASETS.values())
    assert get_dataset_info("svhn").augmentation == "crop"
    assert get_dataset_info("cifar10").augmentation == "crop-flip"


@pytest.mark.parametrize("kind", ["crop", "crop-flip"])
def test_augment_crops_windows_of_the_zero_padded_image_and_repeats_with_the_seed(kind):
    x = torch.rand(64, 3, 10, 12)
    out = augment(x, kind, torch.Generator().manual_seed(5))
    assert out.shape == x.shape
    assert torch.equal(out, augment(x, kind, torch.Generator().manual_seed(5)))  # seeded: resume repeats it
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flipped = 0
    for image, source in zip(out, padded):
        windows = [source[:, i:i + 10, j:j + 12] for i in range(9) for j in range(9)]
        if any(torch.equal(image, w) for w in windows):
            continue
        assert kind == "crop-flip" and any(torch.equal(image.flip(2), w) for w in windows)
        flipped += 1
    assert (kind == "crop") == (flipped == 0)
    assert not torch.equal(out, x)


def test_no_augmentation_returns_the_batch_and_an_unknown_one_is_refused():
    x = torch.rand(4, 1, 8, 8)
    assert augment(x, "none", torch.Generator()) is x
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(x, "rotate", torch.Generator())
