"""What --device accepts here, and the wait before a clock is read."""
import torch

from advmoe.device import synchronizer, unavailable


def test_the_cpu_is_always_there():
    assert unavailable("cpu") is None and unavailable(torch.device("cpu")) is None


def test_a_device_torch_does_not_know_says_what_was_given():
    assert unavailable("nonsense").startswith("--device 'nonsense': ")


def test_cuda_without_a_gpu_says_to_use_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert unavailable("cuda:1") == "--device cuda:1: no CUDA device is available here; use --device cpu"


def test_only_a_gpu_is_waited_for():
    assert synchronizer("cuda") is torch.cuda.synchronize
    assert synchronizer("cpu") is not torch.cuda.synchronize and synchronizer("cpu")() is None
