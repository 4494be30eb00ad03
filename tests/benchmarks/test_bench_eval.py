"""The benchmark times one evaluation both ways on the same images and checks that they agree;
the speed-up is read from its printed ratio (docs/evaluation.md), never asserted on time here."""
import pytest

from benchmarks import bench_eval
from helpers import fmnist_moe_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fmnist_moe_checkpoint(tmp_path_factory.mktemp("bench-eval"))


def test_one_process_and_two_are_timed_on_the_same_images_and_agree(checkpoint, fashion_dir, capsys):
    assert bench_eval.main([str(checkpoint), "--data-dir", str(fashion_dir), "--n-examples", "8", "--batch-size", "4",
                            "--attacks", "pgd", "router", "--rounds", "1", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| 1 x 2 |" in printed and "| 2 x 1 |" in printed
    assert "per-image verdicts the same" in printed


def test_a_single_process_is_the_baseline_not_a_choice(checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        bench_eval.main([str(checkpoint), "--processes", "1"])
    assert e.value.code == 2 and "give 2 or more" in capsys.readouterr().err
