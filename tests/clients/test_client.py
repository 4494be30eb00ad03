"""The Python client and `advmoe predict` against the live test server (conftest.py's `server`)."""
from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from advmoe.card import read_card
from cli.main import main
from clients.client import (AsyncClient, Client, ModelInfo, NotAdvMoEServer, RequestRejected, Unavailable, format_table,
                            task_file_manager)
from helpers import CLASSES


def raw_predict(server, **kwargs) -> list[dict]:
    response = httpx.post(f"{server.url}/predict", timeout=60, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def as_raw(prediction) -> dict:
    """A client Prediction in the server's JSON layout."""
    out = {"top_k": [{"class": s.label, "index": s.index, "probability": s.probability} for s in prediction.top_k]}
    if prediction.experts is not None:
        out["experts"] = list(prediction.experts)
    return out


@pytest.fixture(scope="module")
def pngs(served_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i, image in enumerate(served_images[:4]):
        paths.append(folder / f"item-{i}.png")
        Image.fromarray((image[0] * 255).round().astype(np.uint8), "L").save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, ready_timeout_s=30) as c:
        yield c


@pytest.fixture
def free_url():
    from serving.launch import free_port

    return f"http://127.0.0.1:{free_port()}"


def test_model_info_describes_the_served_model(client, exported_model):
    info = client.model_info
    assert info.classes == tuple(CLASSES) and info.input_shape == (1, 28, 28)
    assert info.architecture == "moe_resnet18" and info.num_experts == 2 and info.max_batch_size == 16
    assert info.tag == exported_model.bento_tag and info.raw["runtime"] == "onnxruntime"
    assert info.card == read_card(exported_model.out)



def test_image_files_get_what_predict_answers_with_their_experts(client, server, pngs):
    predictions = client.predict(pngs, top_k=3)
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in pngs]
    expected = raw_predict(server, files=files, data={"top_k": "3", "return_experts": "true"})
    assert [p.source for p in predictions] == [str(p) for p in pngs]
    assert [as_raw(p) for p in predictions] == expected
    for p in predictions:
        assert p.label == p.top_k[0].label and p.label in CLASSES and 0 < p.probability <= 1
        assert len(p.experts) > 0 and set(p.experts) <= {0, 1}
        assert [s.probability for s in p.top_k] == sorted((s.probability for s in p.top_k), reverse=True)


def test_an_array_larger_than_the_server_batch_is_split_and_kept_in_order(client, server, served_images):
    x = np.concatenate([served_images, served_images[::-1], served_images[:4]])  # 20 inputs; the server takes 16
    predictions = client.predict(x, top_k=2)
    assert [p.source for p in predictions] == [f"inputs[{i}]" for i in range(20)]
    expected = raw_predict(server, json={"inputs": served_images.tolist(), "top_k": 2, "return_experts": True})
    expected = expected + expected[::-1] + expected[:4]
    got = [as_raw(p) for p in predictions]
    for g, e in zip(got, expected):
        assert g["experts"] == e["experts"] and [s["index"] for s in g["top_k"]] == [s["index"] for s in e["top_k"]]
        np.testing.assert_allclose([s["probability"] for s in g["top_k"]], [s["probability"] for s in e["top_k"]],
                                   atol=1e-6)
    routing = np.array([p.experts for p in predictions[:8]])
    assert len(np.unique(routing[:, 0])) == 2, "the test model routes these inputs to both experts"


def test_without_experts_predictions_have_none(client, served_images):
    assert all(p.experts is None for p in client.predict(served_images[:2], experts=False))


def test_a_bad_image_is_refused_with_the_servers_message_and_its_file_name(client, pngs, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    with pytest.raises(RequestRejected) as error:
        client.predict([pngs[0], bad])
    assert error.value.status == 415
    message = str(error.value)
    assert "broken.png (images[1])" in message and "not an image; send PNG or JPEG" in message
    assert len(client.predict([pngs[0]])) == 1  # the client and the server keep working


def test_a_bad_array_and_a_bad_top_k_are_refused_with_the_servers_message(client, served_images):
    with pytest.raises(RequestRejected, match="divide 8-bit values by 255"):
        client.predict(served_images[:1] * 255)
    with pytest.raises(RequestRejected, match="top_k=11"):
        client.predict(served_images[:1], top_k=11)


def test_a_missing_file_is_named_before_anything_is_sent(client, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        client.predict([tmp_path / "nowhere.png"])


def test_an_unreachable_url_says_which_and_what_to_run(free_url):
    with pytest.raises(Unavailable) as error:
        Client(free_url, ready_timeout_s=0.5)
    message = str(error.value)
    assert f"no server answers at {free_url}" in message and "advmoe serve" in message


class NotBento(http.server.BaseHTTPRequestHandler):
    """Another web app: 404 everywhere, or ready (/readyz 200) without BentoML's /schema.json."""
    ready = False

    def do_GET(self):
        self.send_response(200 if self.ready and self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(params=[False, True], ids=["no-readyz", "no-schema"])
def other_server(request):
    handler = type("Handler", (NotBento,), {"ready": request.param})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_server_that_is_not_advmoe_is_named_as_such(other_server):
    with pytest.raises(NotAdvMoEServer, match=f"{other_server} .*not a BentoML service"):
        Client(other_server, ready_timeout_s=5)


def test_the_async_client_agrees_with_the_sync_one(client, server, served_images, pngs):
    async def ask():
        async with AsyncClient(server.url) as aclient:
            return await asyncio.gather(aclient.predict(served_images, top_k=3), aclient.predict(pngs))

    from_array, from_files = asyncio.run(ask())
    assert from_array == client.predict(served_images, top_k=3)
    assert from_files == client.predict(pngs)


def test_a_call_that_ends_closes_its_own_files_not_those_of_calls_still_sending(pngs):
    """BentoML's async client closed every open file when any call ended; concurrent predicts
    then failed with "seek of closed file" whenever one finished while another sent its body."""
    files = task_file_manager()

    async def call(path, done: asyncio.Event, wait_for: asyncio.Event | None):
        _, file, _ = files.get_file(path)
        if wait_for is None:
            files.close()  # this call ends first
            done.set()
            return file
        await wait_for.wait()
        assert not file.closed and file.read(8) == b"\x89PNG\r\n\x1a\n"  # still readable: still sending
        files.close()
        return file

    async def both():  # the waiting call opens its file first, the other opens, closes and ends
        first_done = asyncio.Event()
        return await asyncio.gather(call(pngs[1], asyncio.Event(), first_done), call(pngs[0], first_done, None))

    assert all(file.closed for file in asyncio.run(both()))  # and each call closed its own
    assert files.by_task == {}


def test_format_table_shows_file_class_probability_and_experts(client, pngs):
    table = format_table(client.predict(pngs[:2], top_k=2)).splitlines()
    assert table[0].split() == ["input", "class", "probability", "next", "classes", "experts"]
    assert pngs[0].name in table[1] and len(table) == 3


def test_advmoe_predict_prints_a_table_or_json(server, pngs, capsys):
    assert main(["predict", "--url", server.url, str(pngs[0]), str(pngs[1]), "--experts"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["input", "class", "probability", "experts"]
    with Client(server.url) as c:
        expected = c.predict(pngs[:2])
    for line, p in zip(out[1:], expected):
        assert line.startswith(str(p.source)) and p.label in line and f"{p.probability:.3f}" in line
        experts = f"{p.experts[0]} (all {len(p.experts)} layers)" if len(set(p.experts)) == 1 else \
            " ".join(map(str, p.experts))  # the test model's shared router picks one expert for every layer
        assert line.endswith(experts)

    assert main(["predict", "--url", server.url, str(pngs[0]), "--top-k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["predictions"][0]["source"] == str(pngs[0]) and len(answer["predictions"][0]["top_k"]) == 3
    assert answer["predictions"][0]["top_k"][0]["label"] == expected[0].label and "experts" not in answer["predictions"][0]


def test_advmoe_predict_fails_with_one_line_and_exit_2(server, free_url, tmp_path, capsys):
    assert main(["predict", "--url", free_url, "--wait", "0.5", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and free_url in err[0] and "advmoe serve" in err[0]

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a JPEG")
    assert main(["predict", "--url", server.url, str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jpg (images[0])" in err[0]

    assert main(["predict", "--url", server.url, str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err


# -- no server needed ---------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def test_model_info_is_the_card_plus_the_serving_fields():
    card = read_card(ROOT / "checkpoints" / "fmnist-tiny")
    info = ModelInfo.from_json({"tag": "advmoe:x", **card.to_dict(), "runtime": "torch", "max_batch_size": 8}, "u")
    assert info.card == card and info.classes == card.classes and info.input_shape == (1, 28, 28)
    assert (info.architecture, info.num_experts, info.max_batch_size, info.runtime) == ("moe_resnet18", 2, 8, "torch")
    with pytest.raises(NotAdvMoEServer, match=r"http://h/model_info does not describe .*missing field 'architecture'"):
        ModelInfo.from_json({"status": "ok"}, "http://h")
    with pytest.raises(NotAdvMoEServer, match="expected a JSON object"):
        ModelInfo.from_json(None, "http://h")


def test_the_client_does_not_import_torch():
    probe = "import clients.client, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True)
