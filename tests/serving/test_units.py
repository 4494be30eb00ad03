"""The service's parts without a server: settings, input checks and the bounded attack."""
from __future__ import annotations

import asyncio
import io
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advmoe.settings import ConfigError
from helpers import calibrated_model
from serving.config import RUNTIME_CHOICES, ServingConfig, environment
from serving.batching import Batcher
from serving.inputs import InputSpec, RequestError, decode_image, from_npy, from_tensor
from serving.probe import bounded_attack

SPEC = InputSpec(channels=3, size=32, max_batch_size=4, max_image_pixels=100 * 100)


def test_settings_come_from_the_environment_and_bad_ones_name_their_variable():
    config = ServingConfig.from_env({"ADVMOE_RUNTIME": "torch", "ADVMOE_EXECUTION": "masked",
                                     "ADVMOE_PROBE_ENABLED": "yes", "ADVMOE_PROBE_MAX_EPS": "0.05"})
    assert (config.runtime, config.execution, config.probe_enabled, config.probe_max_eps) == ("torch", "masked", True, 0.05)
    assert ServingConfig.from_env({}) == ServingConfig()
    defaults = ServingConfig()
    assert (defaults.worker_count(cpus=2), defaults.model_threads(cpus=2)) == (2, 1)  # one worker per core
    two = ServingConfig.from_env({"ADVMOE_WORKERS": "2"})
    assert (two.model_threads(cpus=8), ServingConfig(workers=1).model_threads(cpus=8)) == (4, 8)
    for env, message in [({"ADVMOE_RUNTIME": "tensorrt"}, "ADVMOE_RUNTIME 'tensorrt'; choose one of: " + ", ".join(RUNTIME_CHOICES)),
                         ({"ADVMOE_EXECUTION": "dense"}, "ADVMOE_EXECUTION 'dense'"),
                         ({"ADVMOE_EXECUTION": "masked"}, "needs ADVMOE_RUNTIME=torch"),
                         ({"ADVMOE_MAX_BATCH_SIZE": "0"}, "ADVMOE_MAX_BATCH_SIZE=0"),
                         ({"ADVMOE_MAX_BATCH_SIZE": "many"}, "ADVMOE_MAX_BATCH_SIZE='many'"),
                         ({"ADVMOE_PROBE_ENABLED": "maybe"}, "ADVMOE_PROBE_ENABLED"),
                         ({"ADVMOE_PROBE_MAX_EPS": "8"}, "8/255"),
                         ({"ADVMOE_WORKERS": "-1"}, "ADVMOE_WORKERS=-1"),
                         ({"ADVMOE_DEVICE": "tpu"}, "ADVMOE_DEVICE=tpu: give cpu, cuda or cuda:N"),
                         ({"ADVMOE_DEVICE": "cuda"}, "set ADVMOE_RUNTIME=torch"),
                         ({"ADVMOE_DEVICE": "cuda:0", "ADVMOE_RUNTIME": "torch", "ADVMOE_EXECUTION": "masked"},
                          "ADVMOE_EXECUTION sparse")]:
        with pytest.raises(ConfigError, match=message):
            ServingConfig.from_env(env)
    assert ServingConfig.from_env({"ADVMOE_DEVICE": "cuda:1", "ADVMOE_RUNTIME": "torch"}).device == "cuda:1"


def test_the_settings_import_without_torch():  # the API worker of the onnxruntime runtime has none
    probe = "import sys, serving.config, serving.runtimes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).parents[2], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_settings_written_as_variables_read_back_the_same():
    config = ServingConfig(runtime="torch", execution="masked", workers=2, probe_enabled=True, probe_max_eps=8 / 255)
    values = {name: getattr(config, name) for name in ("runtime", "execution", "workers", "probe_enabled", "probe_max_eps")}
    assert ServingConfig.from_env(environment(**values)) == config
    assert ServingConfig.from_env(environment(probe_enabled=False)).probe_enabled is False


@pytest.mark.parametrize("data, reason", [
    (np.zeros((3, 32, 32)), "bad_shape"),
    (np.zeros((1, 1, 32, 32)), "bad_shape"),
    (np.zeros((1, 3, 28, 28)), "bad_shape"),
    (np.zeros((5, 3, 32, 32)), "batch_too_large"),
    (np.zeros((0, 3, 32, 32)), "empty_batch"),
    (np.full((1, 3, 32, 32), -0.1), "out_of_range"),
    (np.full((1, 3, 32, 32), np.nan), "not_finite"),
    ([[[[0.1, 0.2], [0.3]]]], "bad_tensor"),
])
def test_tensors_are_checked_for_shape_range_and_finiteness(data, reason):
    with pytest.raises(RequestError) as error:
        from_tensor(data, SPEC)
    assert error.value.reason == reason and 400 <= error.value.status < 500


def test_a_valid_tensor_passes_unchanged():
    x = np.random.default_rng(0).random((2, 3, 32, 32))
    np.testing.assert_array_equal(from_tensor(x.tolist(), SPEC), x.astype(np.float32))


def encoded(size, mode="RGB", fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, fmt)
    return buffer.getvalue()


def test_images_are_size_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encoded((101, 100)))
    with pytest.raises(RequestError, match="101x100.*10000 pixels") as error:
        decode_image(path, 0, SPEC)
    assert error.value.status == 413
    path.write_bytes(encoded((64, 48), mode="L", fmt="JPEG"))
    pixels = decode_image(path, 0, SPEC)  # grey JPEG -> RGB 32x32 for a 3-channel model
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.float32
    assert np.allclose(pixels, 128 / 255, atol=2 / 255)


def test_the_probe_attack_stops_at_its_deadline_and_stays_in_the_ball():
    model = calibrated_model("moe_resnet18", "shared")
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    capped = bounded_attack(model, x, y, "pgd", eps=0.03, steps=50, step_size=None, timeout_s=0.0)
    assert capped.time_capped and capped.steps_run == 0
    assert (capped.adversarial - x).abs().max() <= 0.03 + 1e-6  # the random start, projected
    full = bounded_attack(model, x, y, "pgd", eps=0.03, steps=3, step_size=None, timeout_s=60)
    assert not full.time_capped and full.steps_run == 3
    assert (full.adversarial - x).abs().max() <= 0.03 + 1e-6 and 0 <= full.adversarial.min()
    fgsm = bounded_attack(model, x, y, "fgsm", eps=0.03, steps=10, step_size=None, timeout_s=60)
    assert fgsm.steps_run == 1
    moved = (fgsm.adversarial - x).abs()
    assert torch.isclose(moved[(x > 0.03) & (x < 0.97)], torch.tensor(0.03)).all()  # one full sign step


def lying_png(width=32, height=32, ihdr_length=None) -> bytes:
    def chunk(kind, data, length=None):
        return struct.pack(">I", len(data) if length is None else length) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header, ihdr_length) + chunk(b"IDAT", zlib.compress(b"\0" * 33 * 32))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("data, status, reason, raised", [
    (lying_png(ihdr_length=5), 400, "corrupt_image", "ValueError"),  # Pillow: "Truncated IHDR chunk"
    (lying_png(ihdr_length=10**6), 400, "corrupt_image", "OSError"),  # Pillow: "Truncated File Read"
    (lying_png(20000, 20000), 413, "image_too_large", None),  # Pillow's DecompressionBombError
    (encoded((32, 32))[:60], 400, "corrupt_image", None),  # pixel data cut short
    (b"GIF89a" + b"\0" * 20, 415, "not_an_image", None),
])
def test_every_decoder_failure_is_a_client_error(data, status, reason, raised):
    with pytest.raises(RequestError) as error:
        decode_image(data, 3, SPEC)
    assert (error.value.status, error.value.reason) == (status, reason)
    assert "images[3]" in error.value.message
    if raised:
        assert raised in error.value.message  # the decoder's own words, for whoever re-encodes the file


@pytest.mark.parametrize("data", [b"", b"\x93NUMPY\x01\x00garbage", b"\x93NUMPY\x01\x00\x10\x00{'descr': 'O'}    \n"])
def test_every_npy_failure_is_a_client_error(data):
    with pytest.raises(RequestError, match="not a readable .npy"):
        from_npy(data, SPEC)


class Recorder:
    """A fake model: records its batch sizes; call k blocks until released."""

    def __init__(self, fail_on=None):
        self.sizes, self.release, self.fail_on = [], threading.Event(), fail_on

    def __call__(self, x):
        self.sizes.append(len(x))
        if len(self.sizes) == 1:
            self.release.wait(10)
        if self.fail_on is not None and self.fail_on in x[:, 0]:
            raise RuntimeError("model failed")
        return x[:, 0] * 10, x[:, 0] + 1


def test_the_batcher_merges_what_queued_while_the_model_ran_and_never_holds_a_lone_request():
    model = Recorder()

    async def scenario():
        batcher = Batcher(model, max_batch_size=8, executor=ThreadPoolExecutor(1))
        first = asyncio.ensure_future(batcher(np.array([[0.0]])))
        await asyncio.sleep(0.05)  # the model is busy with the first request
        burst = [asyncio.ensure_future(batcher(np.array([[i], [i + 0.5]]))) for i in range(1, 6)]  # 10 inputs
        await asyncio.sleep(0.05)
        model.release.set()
        results = await asyncio.gather(first, *burst)
        lone = await batcher(np.array([[7.0]]))  # right after the burst: runs alone, at once
        return results, lone

    results, lone = asyncio.run(scenario())
    assert model.sizes == [1, 8, 2, 1]  # the burst merged up to the cap (whole requests), the lone one alone
    for i, (scaled, shifted) in enumerate(results[1:], start=1):
        np.testing.assert_array_equal(scaled, [i * 10, (i + 0.5) * 10])  # each request gets its own rows
        np.testing.assert_array_equal(shifted, [i + 1, i + 1.5])
    np.testing.assert_array_equal(lone[0], [70.0])


def test_a_failed_model_call_fails_only_the_requests_in_it():
    model = Recorder(fail_on=2.0)

    async def scenario():
        batcher = Batcher(model, max_batch_size=2, executor=ThreadPoolExecutor(1))
        calls = [asyncio.ensure_future(batcher(np.array([[float(i)]]))) for i in range(4)]
        await asyncio.sleep(0.05)
        model.release.set()
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(scenario())
    assert model.sizes == [2, 2]  # queued in the same tick: [0, 1], then [2, 3], which fails
    np.testing.assert_array_equal(results[1][0], [10.0])
    assert isinstance(results[2], RuntimeError) and isinstance(results[3], RuntimeError)
