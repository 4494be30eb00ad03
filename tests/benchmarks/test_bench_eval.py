"""The benchmark times one evaluation both ways on the same images and checks that they agree;
the speed-up is read from its printed ratio (docs/evaluation.md), never asserted on time here."""
import pytest
import torch

import advmoe
from advmoe.calibrate import balance_routing, calibrate_batchnorm
from benchmarks import bench_eval
from helpers import small_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = small_model("moe_resnet18", "shared", in_channels=1, image_size=28, width=0.0625, router_blocks=1,
                        router_width=4)
    x = torch.rand(32, 1, 28, 28)
    calibrate_batchnorm(model, x)
    balance_routing(model, x)
    return advmoe.save_checkpoint(model, tmp_path_factory.mktemp("bench-eval") / "best",
                                  config={"dataset": "fashion_mnist", "training": {"eps": 0.1}})


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
