import shutil
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

import advmoe
from advmoe.image_folder import FolderDataError, scan
from helpers import FOLDER_CLASSES, write_image_folder


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "photos")


def test_classes_come_from_the_folders_and_every_image_reaches_the_models_size(folder):
    info = advmoe.get_dataset_info("folder", folder, image_size=32)
    assert info.classes == FOLDER_CLASSES and info.num_classes == 3 and info.in_channels == 3 and info.image_size == 32
    train = advmoe.load_dataset("folder", "train", folder, val_size=6, image_size=32)
    val = advmoe.load_dataset("folder", "val", folder, val_size=6, image_size=32)
    test = advmoe.load_dataset("folder", "test", folder, image_size=32)
    assert (len(train), len(val), len(test)) == (30, 6, 12)
    assert not set(train.samples) & set(val.samples)
    for data in (train, val, test):  # grey, palette and RGBA files of any size, PNG and JPEG alike
        x, y = next(iter(DataLoader(data, batch_size=len(data))))
        assert x.shape == (len(data), 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert set(y.tolist()) <= {0, 1, 2} and (data is val or set(y.tolist()) == {0, 1, 2})
    assert train.train and not val.train and not test.train  # random resized crops for training images only


def test_the_test_split_is_carved_out_of_train_the_same_way_for_every_seed_when_there_is_no_test_folder(folder):
    shutil.rmtree(folder / "test")
    tests = [advmoe.load_dataset("folder", "test", folder, seed=s).samples for s in (0, 1)]
    assert tests[0] == tests[1] and len(tests[0]) == 4  # a tenth of the 36
    for seed in (0, 1):
        train = advmoe.load_dataset("folder", "train", folder, val_size=3, seed=seed).samples
        val = advmoe.load_dataset("folder", "val", folder, val_size=3, seed=seed).samples
        assert not set(train) & set(tests[0]) and not set(val) & set(tests[0]) and len(train) + len(val) == 32


def test_workers_stream_the_images_and_the_same_seed_gives_the_same_crops(folder):
    train = advmoe.load_dataset("folder", "train", folder, image_size=24)
    batches = []
    for _ in range(2):
        loader = DataLoader(train, batch_size=8, num_workers=2, generator=torch.Generator().manual_seed(3))
        batches.append(next(iter(loader))[0])
    assert torch.equal(*batches)


@pytest.mark.parametrize("damage, message", [
    (lambda root: shutil.rmtree(root / "train" / "dog") or (root / "train" / "dog").mkdir(), "dog: a class folder with no images"),
    (lambda root: (root / "test" / "cat").rename(root / "test" / "lion"), "its classes differ"),
    (lambda root: shutil.rmtree(root / "train"), "no train/ folder"),
    (lambda root: [shutil.rmtree(root / "train" / c) for c in FOLDER_CLASSES], "no class folders"),
    (lambda root: (root / "train" / "cat" / "notes.png").write_bytes(b"not an image"), "notes.png: not an image"),
])
def test_bad_data_is_refused_with_the_file_or_folder_named(folder, damage, message):
    damage(folder)
    with pytest.raises(ValueError, match=message):
        for split in ("train", "test"):
            advmoe.load_dataset("folder", split, folder)


def test_unreadable_images_can_be_left_out_and_counted_and_truncated_ones_replaced(folder):
    (folder / "train" / "cat" / "notes.png").write_bytes(b"not an image")
    whole = (folder / "train" / "dog" / "0.png").read_bytes()
    (folder / "train" / "dog" / "0.png").write_bytes(whole[:len(whole) // 2])  # the header survives, the data not
    with pytest.warns(UserWarning, match="left out 1 file"):
        train = advmoe.load_dataset("folder", "train", folder, val_size=1, bad_images="skip")
    assert scan(str(folder / "train"), "skip").skipped == (str(folder / "train" / "cat" / "notes.png"),)
    truncated = [i for i, (p, _) in enumerate(train.samples) if p.endswith("dog/0.png")]
    assert truncated  # in train, not carved into val or test
    with pytest.warns(UserWarning, match="0.png: cannot be decoded"):
        x, _ = train[truncated[0]]
    assert x.shape == (3, 224, 224)
    (folder / "train" / "cat" / "notes.png").unlink()
    with pytest.raises(ValueError, match="0.png: the image cannot be decoded"):
        advmoe.load_dataset("folder", "train", folder, val_size=1, bad_images="error")[truncated[0]]
    refusing = advmoe.load_dataset("folder", "test", folder)  # test/ is intact
    assert len(refusing) == 12


def test_a_named_data_set_keeps_its_own_size():
    with pytest.raises(ValueError, match="fashion_mnist images are 28x28"):
        advmoe.get_dataset_info("fashion_mnist", image_size=64)
    with pytest.raises(ValueError, match="--data-dir ROOT"):
        advmoe.get_dataset_info("folder")
