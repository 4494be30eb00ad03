"""The service over real HTTP: `bentoml serve` in a subprocess on a free port (conftest.py)."""
from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from advmoe.card import read_card
from clients.loadtest import settled_scrape
from export.graph import onnx_runner
from serving.launch import Server
from helpers import CLASSES, TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(server, route, timeout=60, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/{route}", timeout=timeout, **kwargs)


def reference(exported_model, x: np.ndarray):
    """Softmax probabilities and routing of the exported ONNX file, run here with onnxruntime."""
    import torch

    logits, routing = onnx_runner(exported_model.out / "model.onnx", threads=1)(torch.from_numpy(x))
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True), routing


@pytest.fixture(scope="module")
def answers_correctly(server, exported_model, served_images):
    """check(): a good /predict is answered with the exported model's probabilities and routing;
    check(probe=True): a good /attack_probe is run and scored on the served model. For after a
    refusal: the server still answers, and answers right."""
    x = served_images[:2]
    expected, routing = reference(exported_model, x)

    def check(probe: bool = False):
        if probe:
            response = post(server, "attack_probe", headers=AUTH,
                            json={"inputs": x.tolist(), "labels": [0, 1], "attack": "fgsm", "eps": 0.05,
                                  "steps": 1})
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert [r["clean_index"] for r in results] == expected.argmax(1).tolist()
            assert [r["experts_clean"] for r in results] == routing.tolist()
            assert all(0 < r["linf"] <= 0.05 + 1e-6 for r in results)
            return
        response = post(server, "predict", json={"inputs": x.tolist(), "top_k": 10, "return_experts": True})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        np.testing.assert_allclose([probabilities(p) for p in predictions], expected, atol=1e-5)
        np.testing.assert_array_equal([p["experts"] for p in predictions], routing)

    return check


def probabilities(prediction: dict) -> np.ndarray:
    probs = np.zeros(len(CLASSES))
    for entry in prediction["top_k"]:
        probs[entry["index"]] = entry["probability"]
        assert entry["class"] == CLASSES[entry["index"]]
    return probs


def scrape(server) -> dict[tuple, float]:
    """Every sample on /metrics: {(name, sorted labels): value}."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def png(array: np.ndarray, mode: str = "L", size: int = 28, fmt: str = "PNG") -> bytes:
    image = Image.fromarray((array * 255).round().astype(np.uint8), "L").convert(mode).resize((size, size))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_predictions_equal_the_exported_model(server, exported_model, served_images):
    response = post(server, "predict", json={"inputs": served_images.tolist(), "top_k": 10, "return_experts": True})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    expected, routing = reference(exported_model, served_images)
    assert len(predictions) == len(served_images)
    np.testing.assert_allclose([probabilities(p) for p in predictions], expected, atol=1e-5)
    served_routing = np.array([p["experts"] for p in predictions])
    np.testing.assert_array_equal(served_routing, routing)
    assert len(np.unique(served_routing[:, 0])) == 2, "the calibrated router should use both experts"
    top = predictions[0]["top_k"]
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)


def test_images_and_npy_uploads_are_decoded_as_the_model_needs(server, exported_model, served_images):
    grey = png(served_images[0, 0])
    rgb_large = png(served_images[1, 0], mode="RGB", size=56)  # converted to grey and resized to 28x28
    files = [("images", ("a.png", grey, "image/png")), ("images", ("b.png", rgb_large, "image/png"))]
    response = post(server, "predict", files=files, data={"top_k": "10", "return_experts": "true"})
    assert response.status_code == 200, response.text
    decoded = np.stack([
        np.asarray(Image.open(io.BytesIO(grey)), np.float32)[None] / 255,
        np.asarray(Image.open(io.BytesIO(rgb_large)).convert("L").resize((28, 28), Image.Resampling.BILINEAR),
                   np.float32)[None] / 255,
    ])
    expected, routing = reference(exported_model, decoded)
    predictions = response.json()["predictions"]
    np.testing.assert_allclose([probabilities(p) for p in predictions], expected, atol=1e-5)
    np.testing.assert_array_equal([p["experts"] for p in predictions], routing)

    buffer = io.BytesIO()
    np.save(buffer, served_images[:3])
    response = post(server, "predict", files={"tensor": ("x.npy", buffer.getvalue(), "application/octet-stream")},
                    data={"top_k": "10"})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose([probabilities(p) for p in response.json()["predictions"]],
                               reference(exported_model, served_images[:3])[0], atol=1e-5)


def test_expert_usage_counters_grow_by_exactly_the_routed_samples(server, served_images):
    before = settled_scrape(server.url)
    routed = []
    for batch in (served_images[:1], served_images[1:4], served_images):
        response = post(server, "predict", json={"inputs": batch.tolist(), "return_experts": True})
        assert response.status_code == 200, response.text
        routed += [p["experts"] for p in response.json()["predictions"]]
    routed = np.array(routed)
    layers = routed.shape[1]
    after = settled_scrape(server.url)  # expert counts reach /metrics within half a second
    for layer in range(layers):
        for expert in (0, 1):
            key = ("advmoe_expert_routed_samples_total", (("expert", str(expert)), ("layer", str(layer))))
            grown = after.get(key, 0) - before.get(key, 0)
            assert grown == (routed[:, layer] == expert).sum(), (layer, expert)
    imbalance = [v for (name, labels), v in after.items() if name == "advmoe_routing_imbalance_ratio"]
    assert len(imbalance) == layers and all(1 <= v <= 2 for v in imbalance)
    assert after[("advmoe_batch_size_count", (("endpoint", "predict"),))] > 0


def truncated_png() -> bytes:
    data = png(np.random.default_rng(1).random((28, 28)))  # noise: the pixel data is most of the file
    return data[:len(data) // 2]


def png_chunk(kind: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack(">I", len(data) if length is None else length) + kind + data + \
        struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width=28, height=28, ihdr_length=None) -> bytes:
    """A grey PNG written chunk by chunk, so that its header can lie."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (width + 1) * min(height, 28))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header, ihdr_length) + png_chunk(b"IDAT", pixels) + \
        png_chunk(b"IEND", b"")


def upload(data: bytes, name="a.png", kind="image/png") -> dict:
    return {"files": {"images": (name, data, kind)}}


BROKEN_MULTIPART = b'--xyz\r\nContent-Disposition form-data\r\n\r\nabc\r\n--xyz--\r\n'  # a header without its colon


BAD_REQUESTS = {
    "wrong rank": (dict(json={"inputs": [[[0.5] * 28] * 28]}), 400, "rank 4"),
    "wrong channels": (dict(json={"inputs": np.zeros((1, 3, 28, 28)).tolist()}), 400, "channels"),
    "wrong size": (dict(json={"inputs": np.zeros((1, 1, 32, 32)).tolist()}), 400, "28x28"),
    "ragged": (dict(json={"inputs": [[[[0.1, 0.2], [0.3]]]]}), 400, "rectangular"),
    "nan": (dict(content=json.dumps({"inputs": np.full((1, 1, 28, 28), np.nan).tolist()}).replace("NaN", "NaN"),
                 headers={"content-type": "application/json"}), 400, "NaN"),
    "infinity": (dict(content=json.dumps({"inputs": np.full((1, 1, 28, 28), np.inf).tolist()}),
                      headers={"content-type": "application/json"}), 400, "infinity"),
    "8-bit pixels": (dict(json={"inputs": np.full((1, 1, 28, 28), 255.0).tolist()}), 400, "divide 8-bit values by 255"),
    "not an image": (dict(files={"images": ("a.png", b"hello, world", "image/png")}), 415, "not an image"),
    "truncated image": (dict(files={"images": ("a.png", truncated_png(), "image/png")}), 400, "truncated"),
    "gif": (dict(files={"images": ("a.gif", png(np.zeros((28, 28)), fmt="GIF"), "image/gif")}), 415, "PNG or JPEG"),
    "empty batch": (dict(json={"inputs": []}), 400, "empty"),
    "batch over the cap": (dict(json={"inputs": np.zeros((17, 1, 28, 28)).tolist()}), 413, "limit is 16"),
    "oversized body": (dict(json={"inputs": np.full((16, 1, 28, 28), 1 / 3).tolist()}), 413, "request body"),
    "no input": (dict(json={"top_k": 2}), 400, "send exactly one of"),
    "two inputs": (dict(files={"images": ("a.png", png(np.zeros((28, 28))), "image/png")},
                        data={"inputs": "[]"}), 400, None),
    "bad top_k": (dict(json={"inputs": np.zeros((1, 1, 28, 28)).tolist(), "top_k": 11}), 400, "top_k"),
    # What the image decoder raises on a lying header (each was a 500 before) and Pillow's own bomb limit.
    "PNG header cut short (ValueError)": (upload(crafted_png(ihdr_length=5)), 400, "corrupt header"),
    "PNG chunk past the end (OSError)": (upload(crafted_png(ihdr_length=10**6)), 400, "corrupt header"),
    "PNG claiming 20000x20000 (DecompressionBombError)": (upload(crafted_png(20000, 20000)), 413, "pixels"),
    "not a .npy file": (dict(files={"tensor": ("x.npy", b"\x93NUMPY garbage", "application/octet-stream")}), 400,
                        "not a readable .npy"),
    # What BentoML's own parsing made of malformed requests: 500s, or 400s logged as server errors.
    "broken multipart": (dict(content=BROKEN_MULTIPART, headers={"content-type": "multipart/form-data; boundary=xyz"}),
                         400, "cannot be parsed"),
    "multipart without boundary": (dict(content=b"abc", headers={"content-type": "multipart/form-data"}), 400,
                                   "cannot be parsed"),
    "text where a file goes": (dict(data={"images": "http://127.0.0.1:1/a.png"}), 400, "uploaded as a file"),
    "a server path in JSON": (dict(json={"images": ["/etc/passwd"]}), 400, "multipart/form-data"),
    "top_k not a number": (dict(files={"images": ("a.png", png(np.zeros((28, 28))), "image/png")},
                                data={"top_k": "three"}), 400, "top_k"),
    "return_experts not a bool": (dict(json={"inputs": np.zeros((1, 1, 28, 28)).tolist(), "return_experts": "maybe"}),
                                  400, "return_experts"),
    "inputs not a list": (dict(json={"inputs": "zeros"}), 400, "inputs"),
    "invalid JSON": (dict(content=b'{"inputs": [', headers={"content-type": "application/json"}), 400,
                     "not valid JSON"),
    "JSON not an object": (dict(json=[[[[0.5]]]]), 400, "JSON object"),
    "unknown field": (dict(json={"input": np.zeros((1, 1, 28, 28)).tolist()}), 400, "unknown field"),
    "pickled body": (dict(content=b"x", headers={"content-type": "application/vnd.bentoml+pickle"}), 415,
                     "content type"),
}


def rejected(server) -> float:
    return sum(v for (name, labels), v in scrape(server).items()
               if name == "advmoe_rejected_requests_total" and ("endpoint", "predict") in labels)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_that_says_what_to_fix_and_the_server_keeps_serving(server, answers_correctly, case):
    kwargs, status, message = BAD_REQUESTS[case]
    before = rejected(server)
    response = post(server, "predict", **kwargs)
    assert response.status_code == status, response.text
    if message:
        assert message in response.json()["error"]
    assert rejected(server) == before + 1  # counted in advmoe_rejected_requests_total, once
    answers_correctly()


def test_client_mistakes_are_one_log_line_not_a_server_error(server):
    cases = ("broken multipart", "top_k not a number", "invalid JSON", "PNG chunk past the end (OSError)")
    start = len(server.log_path.read_text(errors="replace"))
    for case in cases:
        kwargs, status, _ = BAD_REQUESTS[case]
        assert post(server, "predict", **kwargs).status_code == status
    time.sleep(0.5)  # the workers' log lines reach the file through the server process
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "ERROR" not in log and "Exception on" not in log, log[-3000:]
    lines = [line for line in log[start:].splitlines() if "predict 4" in line]
    assert len(lines) == len(cases), log[start:]


def test_an_empty_npy_batch_is_refused(server, answers_correctly):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((0, 1, 28, 28), np.float32))
    response = post(server, "predict", files={"tensor": ("x.npy", buffer.getvalue(), "application/octet-stream")})
    assert response.status_code == 400 and "empty" in response.json()["error"]
    answers_correctly()


def test_a_chunked_body_over_the_limit_gets_413(server, answers_correctly):
    def body():
        for _ in range(50):
            yield b" " * 10_000  # 500 kB, over the test server's 200 kB, with no Content-Length

    response = post(server, "predict", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    answers_correctly()


def test_500_concurrent_predicts_all_succeed_and_get_batched(server, served_images):
    before = scrape(server)

    async def storm():
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            requests = [client.post("/predict", json={"inputs": served_images[i % 8:i % 8 + 1].tolist()}) for i in range(500)]
            return await asyncio.gather(*requests)

    responses = asyncio.run(storm())
    assert [r.status_code for r in responses] == [200] * 500
    after = scrape(server)
    calls = after[("advmoe_batch_size_count", (("endpoint", "predict"),))] - \
        before[("advmoe_batch_size_count", (("endpoint", "predict"),))]
    samples = after[("advmoe_batch_size_sum", (("endpoint", "predict"),))] - \
        before[("advmoe_batch_size_sum", (("endpoint", "predict"),))]
    assert samples == 500
    assert calls < 500, "adaptive batching should merge concurrent requests"


def test_model_info_is_in_the_openapi_document_like_the_apis(server):
    paths = httpx.get(f"{server.url}/docs.json", timeout=10).json()["paths"]
    assert "get" in paths["/model_info"] and "post" in paths["/predict"] and "post" in paths["/attack_probe"]
    fields = json.dumps(httpx.get(f"{server.url}/docs.json", timeout=10).json()["components"])
    assert "return_experts" in fields and "top_k" in fields  # the typed inputs are documented as before


def test_model_info_reports_the_model_metadata(server, exported_model):
    info = httpx.get(f"{server.url}/model_info", timeout=10).json()
    assert info["tag"] == exported_model.bento_tag
    assert info["architecture"] == "moe_resnet18" and info["num_experts"] == 2 and info["expert_ratio"] == 0.5
    assert info["dataset"] == "fashion_mnist" and info["classes"] == CLASSES
    assert info["clean_accuracy"] == 0.5 and info["macs_per_image"] > 0 and info["robust_accuracy"] is None
    assert info["runtime"] == "onnxruntime" and info["attack_probe"]["enabled"] is True
    card = read_card(exported_model.out).to_dict()
    assert {k: info[k] for k in card} == card  # the model card, plus how this server serves it
    for route in ("livez", "readyz"):
        assert httpx.get(f"{server.url}/{route}", timeout=10).status_code == 200


PROBE = {"labels": [0, 1], "eps": 0.05, "steps": 3}


@pytest.mark.parametrize("headers, status", [({}, 401), ({"Authorization": "Bearer wrong"}, 403),
                                             ({"Authorization": f"Basic {TOKEN}"}, 403)])
def test_probe_requires_its_token(server, served_images, answers_correctly, headers, status):
    body = {**PROBE, "inputs": served_images[:2].tolist()}
    assert post(server, "attack_probe", json=body, headers=headers).status_code == status
    answers_correctly(probe=True)
    answers_correctly()


@pytest.mark.parametrize("change, status, message", [
    ({"eps": 0.2}, 400, "eps=0.2"),
    ({"eps": 8}, 400, "8/255"),
    ({"steps": 6}, 400, "steps=6"),
    ({"attack": "cw"}, 400, "fgsm, pgd"),
    ({"labels": [0]}, 400, "one label per input"),
    ({"n": 1, "labels": 9}, 400, 'send a list, even of one: "labels": [9]'),
    ({"labels": [0, 10]}, 400, "class indices"),
    ({"n": 5, "labels": [0] * 5}, 413, "limit is 4"),
])
def test_probe_respects_its_caps(server, served_images, answers_correctly, change, status, message):
    change = dict(change)
    n = change.pop("n", 2)
    response = post(server, "attack_probe", json={**PROBE, "inputs": served_images[:n].tolist(), **change}, headers=AUTH)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    answers_correctly(probe=True)
    answers_correctly()


def test_a_probe_form_with_one_label_not_in_a_list_is_told_the_list_to_send(server, served_images, answers_correctly):
    response = post(server, "attack_probe", headers=AUTH, files={"images": ("a.png", png(served_images[0, 0]), "image/png")},
                    data={"labels": "9", "eps": "0.1"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == ("labels: Input should be a valid list; send a list, even of one: labels=[9] "
                                        "(a form field holds JSON)")
    answers_correctly(probe=True)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_probe_attacks_the_served_model_and_counts_flips(server, exported_model, served_images, attack):
    before = scrape(server)
    x = served_images[:4]
    labels = reference(exported_model, x)[0].argmax(1).tolist()  # attack the model's own predictions
    response = post(server, "attack_probe", headers=AUTH, json={
        "inputs": x.tolist(), "labels": labels, "attack": attack, "eps": 0.1, "steps": 5, "return_adversarial": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["steps_run"] == (1 if attack == "fgsm" else 5) and body["time_capped"] is False
    assert body["clean_accuracy"] == 1.0
    flips = routes = 0
    for i, item in enumerate(body["results"]):
        adversarial = np.array(item["adversarial_image"], np.float32)
        assert item["linf"] <= 0.1 + 1e-6 and np.abs(adversarial - x[i]).max() <= 0.1 + 1e-6
        assert adversarial.min() >= 0 and adversarial.max() <= 1
        # What the probe reports is what the served model says on that adversarial image.
        probs, routing = reference(exported_model, adversarial[None])
        assert item["adversarial_index"] == probs.argmax()
        assert item["experts_adversarial"] == routing[0].tolist()
        assert item["prediction_flipped"] == (item["clean_index"] != item["adversarial_index"])
        assert item["route_flipped"] == (item["experts_clean"] != item["experts_adversarial"])
        flips += item["prediction_flipped"]
        routes += item["route_flipped"]
    assert body["adversarial_accuracy"] == 1 - flips / 4
    after = scrape(server)
    for name, grown in (("advmoe_probe_requests_total", 1), ("advmoe_probe_samples_total", 4),
                        ("advmoe_probe_prediction_flips_total", flips), ("advmoe_probe_route_flips_total", routes)):
        key = (name, (("attack", attack),))
        assert after[key] - before.get(key, 0) == grown, name


@pytest.mark.parametrize("runtime", ["torch", "pt2"])
def test_probe_is_off_unless_enabled_and_torch_runtimes_serve_the_same(exported_model, served_images, tmp_path,
                                                                        runtime):
    env = {"ADVMOE_MODEL_TAG": exported_model.bento_tag, "ADVMOE_RUNTIME": runtime, "ADVMOE_THREADS": "1"}
    with Server(env, log_path=tmp_path / "serve.log") as server:
        response = post(server, "attack_probe", json={**PROBE, "inputs": served_images[:2].tolist()}, headers=AUTH)
        assert response.status_code == 404 and "ADVMOE_PROBE_ENABLED" in response.json()["error"]
        response = post(server, "predict", json={"inputs": served_images.tolist(), "top_k": 10, "return_experts": True})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        expected, routing = reference(exported_model, served_images)
        np.testing.assert_allclose([probabilities(p) for p in predictions], expected, atol=1e-4)
        np.testing.assert_array_equal([p["experts"] for p in predictions], routing)
        assert httpx.get(f"{server.url}/model_info", timeout=10).json()["runtime"] == runtime
