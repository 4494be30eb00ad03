"""The service's parts without a server: settings, input checks and the bounded attack."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import calibrated_model
from serving.config import ConfigError, ServingConfig
from serving.inputs import InputSpec, RequestError, decode_image, from_tensor
from serving.probe import bounded_attack

SPEC = InputSpec(channels=3, size=32, max_batch_size=4, max_image_pixels=100 * 100)


def test_settings_come_from_the_environment_and_bad_ones_name_their_variable():
    config = ServingConfig.from_env({"ADVMOE_RUNTIME": "torch", "ADVMOE_EXECUTION": "masked",
                                     "ADVMOE_PROBE_ENABLED": "yes", "ADVMOE_PROBE_MAX_EPS": "0.05"})
    assert (config.runtime, config.execution, config.probe_enabled, config.probe_max_eps) == ("torch", "masked", True, 0.05)
    assert ServingConfig.from_env({}) == ServingConfig()
    for env, message in [({"ADVMOE_RUNTIME": "tensorrt"}, "ADVMOE_RUNTIME='tensorrt'"),
                         ({"ADVMOE_EXECUTION": "masked"}, "needs ADVMOE_RUNTIME=torch"),
                         ({"ADVMOE_MAX_BATCH_SIZE": "0"}, "ADVMOE_MAX_BATCH_SIZE=0"),
                         ({"ADVMOE_MAX_BATCH_SIZE": "many"}, "ADVMOE_MAX_BATCH_SIZE='many'"),
                         ({"ADVMOE_PROBE_ENABLED": "maybe"}, "ADVMOE_PROBE_ENABLED"),
                         ({"ADVMOE_PROBE_MAX_EPS": "8"}, "8/255")]:
        with pytest.raises(ConfigError, match=message):
            ServingConfig.from_env(env)


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
