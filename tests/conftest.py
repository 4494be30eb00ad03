"""Fixtures shared by the suite; plain helpers are in helpers.py."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

# The tests' BentoML model store: never the user's ~/bentoml. Set before anything imports bentoml.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="advmoe-tests-bentoml-")
# Under pytest-xdist (`make test` runs one worker per core) each worker computes on one thread:
# two workers of two threads on two cores spin-wait on each other's cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import advmoe  # noqa: E402
from advmoe.calibrate import balance_routing, calibrate_batchnorm  # noqa: E402
from helpers import CLASSES, SERVER_ENV, make_fashion_like, small_model  # noqa: E402


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Commands called in-process (`main([..., "--threads", "2"])`) set torch's thread count for the
    whole process: put it back, or a worker's later tests run two threads against the other worker's."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny steps (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a
    busy machine a second torch thread only adds synchronisation (3-10x slower, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    return make_fashion_like(tmp_path_factory.mktemp("fashion"))


# -- a real `bentoml serve` of a small model exported in the test session (temporary BENTOML_HOME
# above), shared by the serving and client tests; talked to over HTTP.
@pytest.fixture(scope="session")
def exported_model(tmp_path_factory):
    """A Fashion-MNIST-shaped MoE ResNet-18 (1x28x28, 10 classes, shared router), calibrated so
    that both experts get samples, exported to ONNX and the BentoML store."""
    from export import export_checkpoint

    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    model = small_model("moe_resnet18", "shared", in_channels=1, image_size=28)
    x = torch.rand(64, 1, 28, 28)
    calibrate_batchnorm(model, x)
    balance_routing(model, x)
    checkpoint = advmoe.save_checkpoint(model, root / "checkpoint", metrics={"clean_accuracy": 0.5},
                                        config={"dataset": "fashion_mnist", "classes": CLASSES})
    # No runtime timing: the served runtime is then onnxruntime, which the tests compare with.
    return export_checkpoint(checkpoint, root / "export", ["onnx", "triton", "bento"], time_runtimes=False,
                             log=lambda *a: None)


@pytest.fixture(scope="session")
def server(exported_model, tmp_path_factory):
    from serving.launch import Server

    env = {"ADVMOE_MODEL_TAG": exported_model.bento_tag, **SERVER_ENV}
    with Server(env, log_path=tmp_path_factory.mktemp("logs") / "serve.log") as running:
        yield running


@pytest.fixture(scope="session")
def served_images():
    """Eight 1x28x28 inputs in [0, 1] that the calibrated router splits over both experts."""
    return np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
