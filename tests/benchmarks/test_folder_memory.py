import pytest

import advmoe
from benchmarks import folder_memory


def test_the_generated_folder_is_a_data_set_of_its_size(tmp_path):
    root = folder_memory.write_folder(tmp_path, 120)
    assert len(advmoe.load_dataset("folder", "train", root, val_size=20)) == 100
    assert advmoe.get_dataset_info("folder", root).num_classes == folder_memory.CLASSES


def test_a_folder_too_small_for_the_same_steps_is_refused(capsys):
    with pytest.raises(SystemExit):
        folder_memory.main(["--images", "100", "20000"])
    assert "so that each trains 20 full steps" in capsys.readouterr().err
