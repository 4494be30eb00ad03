"""The Triton client over HTTP and gRPC against the local Triton server (nvidia-pytriton's bundled
tritonserver in its own venv) serving a freshly exported MoE model: same answers as onnxruntime
on the exported model.onnx, the exported config.pbtxt as the server's config, clear errors."""
import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tritonclient.http
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from clients import triton_client, triton_server
from clients.triton_client import TritonClient, TritonInputError, TritonUnavailable, parse_url
from export.graph import onnx_session

ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ("http", "grpc")


# -- no server needed ---------------------------------------------------------------------------
def test_triton_extra_pins_what_the_server_venv_gets():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["triton"] == list(triton_server.REQUIREMENTS)
    assert not any(r.startswith("nvidia-pytriton") for r in extras["dev"])  # it pulls numpy back to 1.26


def test_the_server_venv_is_one_per_machine_named_after_python_and_its_pins(tmp_path, monkeypatch):
    """Clones share it (it holds no project code); other pins or another Python get another one."""
    monkeypatch.delenv(triton_server.VENV_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    venv = triton_server.default_venv()
    assert venv.parent == tmp_path / "advmoe"
    assert venv.name.startswith(f"triton-venv-py{sys.version_info.major}.{sys.version_info.minor}-")
    monkeypatch.setattr(triton_server, "REQUIREMENTS", ("nvidia-pytriton==0.7.1", "onnxruntime==1.32.0"))
    assert triton_server.default_venv() != venv and triton_server.default_venv().parent == venv.parent
    monkeypatch.setenv(triton_server.VENV_ENV, str(tmp_path / "mine"))
    assert triton_server.default_venv() == tmp_path / "mine"


def test_two_setups_of_the_shared_venv_run_one_after_the_other(tmp_path, monkeypatch):
    inside, overlaps = [], []

    def install(venv, python, log):
        overlaps.append(bool(inside))
        inside.append(venv)
        time.sleep(0.3)
        inside.remove(venv)
        return venv

    monkeypatch.setattr(triton_server, "_setup", install)
    venv = tmp_path / "cache" / "advmoe" / "triton-venv"
    threads = [threading.Thread(target=triton_server.setup, args=(venv,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [False, False] and (venv.parent / "triton-venv.lock").is_file()


def test_clients_import_neither_torch_nor_the_other_applications():
    probe = ("import sys, clients.triton_client, clients.triton_server; "
             "print(sorted(m for m in ('torch', 'advmoe', 'serving', 'training', 'export') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_local_server_picks_the_onnx_model_beside_the_torchscript_one(tmp_path):
    for model, file in (("advmoe", "model.onnx"), ("advmoe_libtorch", "model.pt")):
        (tmp_path / model / "1").mkdir(parents=True)
        (tmp_path / model / "1" / file).write_bytes(b"")
        (tmp_path / model / "config.pbtxt").write_text(f'name: "{model}"')
    assert triton_server.find_model(tmp_path, None) == tmp_path / "advmoe"
    assert triton_server.find_model(tmp_path, "advmoe_libtorch") == tmp_path / "advmoe_libtorch"
    (tmp_path / "advmoe_libtorch" / "1" / "model.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="holds 2 ONNX models .*name one with --model"):
        triton_server.find_model(tmp_path, None)


@pytest.mark.parametrize("url, protocol, expected", [
    ("localhost", None, ("http", "localhost:8000", False)),
    ("grpc://10.0.0.5", None, ("grpc", "10.0.0.5:8001", False)),
    ("127.0.0.1:9001", "grpc", ("grpc", "127.0.0.1:9001", False)),
    ("https://triton.example:443/", None, ("http", "triton.example:443", True)),
    ("[::1]", "grpc", ("grpc", "[::1]:8001", False)),
])
def test_urls(url, protocol, expected):
    assert parse_url(url, protocol) == expected


@pytest.mark.parametrize("url, protocol", [("ftp://h:1", None), ("http://h:1", "grpc"), ("h:1/v2", None),
                                           ("h:1", "tcp")])
def test_bad_urls_say_what_to_write(url, protocol):
    with pytest.raises(ValueError, match="Triton URL|protocol"):
        parse_url(url, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_url_fails_by_its_deadline_and_says_what_to_check(protocol, monkeypatch):
    """On a clock that only the client's sleeps move: it polls every 0.25 s until its 0.5 s are
    up, then gives up."""
    now, probes = [0.0], []
    monkeypatch.setattr(triton_client, "time", SimpleNamespace(monotonic=lambda: now[0],
                                                               sleep=lambda s: now.__setitem__(0, now[0] + s)))
    probe = TritonClient._probe

    def counted_probe(self):
        probes.append(now[0])
        return probe(self)

    monkeypatch.setattr(TritonClient, "_probe", counted_probe)
    port = triton_server.free_port()  # nothing listens there
    with pytest.raises(TritonUnavailable, match=rf"cannot reach a Triton server at {protocol}://127.0.0.1:{port} "
                                                r"after waiting 0.5s: .*Is the server running"):
        TritonClient(f"{protocol}://127.0.0.1:{port}", wait=0.5)
    assert probes == [0.0, 0.25, 0.5] and now[0] == 0.5


# -- against the local Triton server ------------------------------------------------------------
@pytest.fixture(scope="module")
def server_python():
    problem = triton_server.check_venv()
    if problem is not None:
        message = f"the local Triton server's venv is not set up: {problem}"
        if os.environ.get("CI"):  # CI must run these tests: .ci/run sets the venv up first
            pytest.fail(message)
        pytest.skip(message)
    return triton_server.venv_python()


@pytest.fixture(scope="module")
def exported(exported_model):
    """The test session's exported model (tests/conftest.py: a 1x28x28 MoE ResNet-18, 16 MoE
    layers, with its Triton repository): one export for the serving and the client tests."""
    return exported_model.out


@pytest.fixture(scope="module")
def server(server_python, exported, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-log") / "server.log"
    local = triton_server.LocalTritonServer(exported / "triton", log_file=log).start(timeout=90)
    pids = local.pids()
    assert len(pids) >= 2, f"expected the launcher and tritonserver, found {pids}"
    yield local
    local.stop()
    assert local.process.poll() is not None
    assert local.pids() == [], f"processes left after stop: {local.pids()}"


@pytest.fixture(scope="module")
def reference(exported):
    session = onnx_session(exported / "model.onnx")
    return lambda x: session.run(None, {"input": x})


def client_for(server, protocol, **kwargs):
    return TritonClient(server.http_url if protocol == "http" else server.grpc_url, model="advmoe", **kwargs)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_serves_the_exported_config(server, exported, protocol):
    expected = text_format.Parse((exported / "triton/advmoe/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    kind = lambda t: model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_")  # noqa: E731
    with client_for(server, protocol) as client:
        assert client.max_batch_size == expected.max_batch_size == 64
        assert [(t.name, t.datatype, t.shape) for t in client.inputs] == [
            (t.name, kind(t), tuple(t.dims)) for t in expected.input]
        assert [(t.name, t.datatype, t.shape) for t in client.outputs] == [
            (t.name, kind(t), tuple(t.dims)) for t in expected.output]
        batching, exported_batching = client.config["dynamic_batching"], expected.dynamic_batching
        assert [int(b) for b in batching["preferred_batch_size"]] == list(exported_batching.preferred_batch_size)
        assert int(batching["max_queue_delay_microseconds"]) == exported_batching.max_queue_delay_microseconds


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_gives_onnxruntime_logits_and_routing(server, reference, protocol):
    rng = np.random.default_rng({"http": 1, "grpc": 2}[protocol])
    with client_for(server, protocol) as client:
        for batch in (1, 6, 70):  # 70 > max_batch_size: the client splits it
            x = rng.random((batch, 1, 28, 28), dtype=np.float32)
            logits, routing = client.infer(x)
            expected_logits, expected_routing = reference(x)
            assert logits.shape == expected_logits.shape == (batch, 10) and logits.dtype == np.float32
            assert routing.shape == expected_routing.shape == (batch, 16) and routing.dtype == np.int64
            np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
            np.testing.assert_array_equal(routing, expected_routing)
    assert len(np.unique(routing[:, 0])) == 2  # both experts used: the routing comparison means something


def metric(server, name: str) -> float:
    text = triton_server.http_get(server.metrics_url).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'model="advmoe"' in line)


def test_concurrent_requests_each_get_their_own_answer(server, reference):
    """Requests from several clients at once go through the dynamic batcher; none gets another's rows."""
    images = np.random.default_rng(3).random((24, 1, 1, 28, 28), dtype=np.float32)
    results, errors = [None] * len(images), []
    before = metric(server, "nv_inference_count")

    def worker(k):
        try:
            with client_for(server, PROTOCOLS[k % 2]) as client:
                for i in range(k, len(images), 4):
                    results[i] = client.infer(images[i])
        except Exception as error:  # reported below, with the thread's error
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for x, (logits, routing) in zip(images, results):
        expected_logits, expected_routing = reference(x)
        np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(routing, expected_routing)
    assert metric(server, "nv_inference_count") - before == len(images)  # the metrics endpoint counts them


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_inputs_are_refused_with_what_to_change(server, protocol):
    with client_for(server, protocol) as client:
        with pytest.raises(TritonInputError, match=r"shape \[2, 1, 32, 32\].*takes 'input' \[B, 1, 28, 28\]"):
            client.infer(np.zeros((2, 1, 32, 32), np.float32))
        with pytest.raises(TritonInputError, match=r"shape \[2, 3, 28, 28\].*\[B, 1, 28, 28\]"):
            client.infer(np.zeros((2, 3, 28, 28), np.float32))
        with pytest.raises(TritonInputError, match=r"without a batch axis.*x\[None\]"):
            client.infer(np.zeros((1, 28, 28), np.float32))
        with pytest.raises(TritonInputError, match=r"\[0, 1\].*divide 8-bit images by 255"):
            client.infer(np.full((1, 1, 28, 28), 255, np.uint8))
        with pytest.raises(TritonInputError, match="empty batch"):
            client.infer(np.zeros((0, 1, 28, 28), np.float32))


def test_the_server_itself_refuses_a_wrong_shape(server):
    """As Triton with the exported config.pbtxt would: the config's dims are enforced server-side."""
    raw = tritonclient.http.InferenceServerClient(server.http_url.removeprefix("http://"))
    request = tritonclient.http.InferInput("input", [1, 3, 32, 32], "FP32")
    request.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException, match=r"unexpected shape"):
        raw.infer("advmoe", [request])
    raw.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_model_is_a_clear_error(server, protocol):
    with pytest.raises(TritonUnavailable, match=r"is up but model 'resnet' is not ready after waiting 0.5s"):
        TritonClient(server.http_url if protocol == "http" else server.grpc_url, model="resnet", wait=0.5)
