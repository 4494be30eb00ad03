"""The locust load test against the live test server (conftest.py's `server`)."""
from __future__ import annotations

import json
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from cli.main import main
from clients.client import Client
from clients.loadtest import expert_share, require_loopback, run_level, run_loadtest, served_work, summarize


def test_a_short_load_test_completes_without_errors_and_writes_its_report(server, tmp_path):
    metrics_before = httpx.get(f"{server.url}/metrics", timeout=10).text
    result = run_loadtest(server.url, concurrency=(1, 8), duration_s=2, max_requests=20000, out_dir=tmp_path)
    assert "locust" not in sys.modules, "locust runs in a process of its own"
    assert [level.concurrency for level in result.levels] == [1, 8]
    for level in result.levels:
        assert level.spawned_users == level.concurrency
        assert level.requests > level.concurrency and level.errors == 0 and level.error_rate == 0
        # the level stops by itself: after its 2 s and the requests then in flight (none is left
        # without an answer: errors == 0), or at its budget (a fast machine sends 20000 in under 2 s)
        if level.stopped_by == "clock":
            assert level.seconds >= 2 and level.requests < 20000
        else:
            assert level.stopped_by == "request budget" and level.requests == 20000
        assert level.throughput_rps == pytest.approx(level.requests / level.seconds)
        assert level.images == level.requests and level.images_per_s == level.throughput_rps  # one image a request
        assert 0 < level.p50_ms <= level.p95_ms <= level.p99_ms <= level.max_ms
        # every request of the level reached the model once; the batcher merges some of them
        assert level.model_calls > 0 and 1 <= level.mean_batch_size <= 16
        assert level.model_calls * level.mean_batch_size == pytest.approx(level.requests)
        assert set(level.expert_usage) and all(sum(e.values()) == level.requests for e in level.expert_usage.values())
        assert len(level.expert_share) == 2 and sum(level.expert_share) == pytest.approx(1)
    assert result.levels[0].mean_batch_size == 1, "one user: nothing to merge"
    assert result.model["architecture"] == "moe_resnet18" and metrics_before

    report = json.loads((tmp_path / "loadtest.json").read_text())
    assert report["levels"][1]["requests"] == result.levels[1].requests and report["settings"]["duration_s"] == 2
    markdown = (tmp_path / "loadtest.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| 1 |") or line.startswith("| 8 |")]
    assert len(rows) == 2 and f"| {result.levels[1].requests} | 0 (0.0 %) |" in rows[1]
    assert (tmp_path / "locust-c8.log").is_file()


def test_the_request_budget_stops_a_level_and_the_cli_writes_its_report(server, served_images, tmp_path, capsys):
    np.save(tmp_path / "inputs.npy", served_images)
    code = main(["loadtest", "--url", server.url, "--concurrency", "4", "--duration", "30", "--max-requests", "12",
                 "--payload", "npy", "--batch-size", "2", "--inputs", str(tmp_path / "inputs.npy"),
                 "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert "loadtest.md" in capsys.readouterr().out
    level = json.loads((tmp_path / "loadtest.json").read_text())["levels"][0]
    assert level["requests"] == 12 and level["errors"] == 0
    assert level["stopped_by"] == "request budget" and "| request budget |" in (tmp_path / "loadtest.md").read_text()
    assert level["images_per_s"] == pytest.approx(2 * level["throughput_rps"])
    # 12 requests of 2 inputs: the 8 given inputs three times over, routed as the client sees them
    with Client(server.url) as client:
        routing = np.array([p.experts for p in client.predict(served_images)])
    for layer, experts in level["expert_usage"].items():
        expected = np.bincount(routing[:, int(layer)], minlength=2) * 3
        assert [experts.get(str(e), 0) for e in range(2)] == expected.tolist()


def test_run_level_sends_the_given_image_files_and_returns_a_dict(server, served_images, tmp_path):
    paths = []
    for i, image in enumerate(served_images[:3]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((image[0] * 255).round().astype(np.uint8), "L").save(paths[-1])
    level = run_level(server.url, 2, duration_s=20, images=[p.read_bytes() for p in paths], max_requests=9,
                      warmup_requests=0)
    assert level["requests"] == 9 and level["errors"] == 0 and level["images"] == 9
    assert level["stopped_by"] == "request budget"  # not its 20 s clock
    assert level["p99_ms"] > 0 and level["mean_batch_size"] >= 1 and level["concurrency"] == 2
    with Client(server.url) as client:  # each file three times over, routed as the client sees it
        routing = np.array([p.experts for p in client.predict(paths)])
    assert level["expert_usage"]["0"] == {str(e): 3 * int(n) for e, n in enumerate(np.bincount(routing[:, 0])) if n}


def test_errors_are_counted_not_hidden(server):
    # top_k=11 of 10 classes: the server refuses every request with 400
    result = run_loadtest(server.url, concurrency=(2,), duration_s=2, max_requests=6, top_k=11, warmup_requests=0)
    level = result.levels[0]
    assert level.requests == 6 and level.errors == 6 and level.error_rate == 1 and level.throughput_rps == 0
    [(message, count)] = level.error_messages.items()
    assert count == 6 and message.startswith("HTTP 400: ") and "top_k=11" in message
    assert level.model_calls == 0 and level.mean_batch_size is None and result.errors == 6


@pytest.mark.parametrize("url", ["http://10.1.2.3:3000", "http://example.com", "192.168.0.1:3000"])
def test_remote_targets_are_refused_without_the_flag(url, capsys):
    with pytest.raises(ValueError, match="--allow-remote"):
        require_loopback(url)
    assert require_loopback(url, allow_remote=True) == url
    assert main(["loadtest", "--url", url, "--duration", "1"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["http://127.0.0.1:3000", "http://localhost:3000", "http://[::1]:3000", "127.0.0.5"])
def test_loopback_targets_are_accepted(url):
    assert require_loopback(url) == url


def test_served_work_is_the_metrics_delta_of_predict_only():
    before = {("advmoe_batch_size_count", (("endpoint", "predict"),)): 10.0,
              ("advmoe_batch_size_sum", (("endpoint", "predict"),)): 30.0,
              ("advmoe_batch_size_count", (("endpoint", "attack_probe"),)): 1.0,
              ("advmoe_expert_routed_samples_total", (("expert", "0"), ("layer", "0"))): 20.0}
    after = {**before, ("advmoe_batch_size_count", (("endpoint", "predict"),)): 14.0,
             ("advmoe_batch_size_sum", (("endpoint", "predict"),)): 50.0,
             ("advmoe_batch_size_count", (("endpoint", "attack_probe"),)): 5.0,
             ("advmoe_expert_routed_samples_total", (("expert", "0"), ("layer", "0"))): 35.0,
             ("advmoe_expert_routed_samples_total", (("expert", "1"), ("layer", "0"))): 5.0,
             ("advmoe_expert_routed_samples_total", (("expert", "1"), ("layer", "1"))): 20.0}
    work = served_work(before, after)
    assert work == {"model_calls": 4, "model_inputs": 20, "mean_batch_size": 5.0,
                    "expert_usage": {"0": {"0": 15, "1": 5}, "1": {"1": 20}}}
    assert expert_share(work["expert_usage"]) == [15 / 40, 25 / 40]
    assert expert_share({"0": {"0": 4}}, num_experts=2) == [1.0, 0.0] and expert_share({}) == []
    assert served_work(before, before)["mean_batch_size"] is None


def test_requests_left_in_flight_at_the_hard_stop_count_as_errors():
    child = {"records": [[0.0, 0.1, True], [0.05, 0.2, True], [0.1, 0.3, False]], "issued": 5,
             "errors": {"HTTP 503: busy": 1}, "spawned_users": 2}
    work = {"mean_batch_size": 1.5, "model_calls": 2, "expert_usage": {"0": {"1": 3}}}
    level = summarize(2, 4, child, work, num_experts=2)
    assert level.requests == 5 and level.errors == 3 and level.error_rate == 3 / 5
    assert level.error_messages == {"HTTP 503: busy": 1, "no answer before the level's hard stop": 2}
    assert level.seconds == pytest.approx(0.4) and level.throughput_rps == pytest.approx(2 / 0.4)
    assert level.images == 8 and level.images_per_s == pytest.approx(4 * 2 / 0.4) and level.expert_share == [0, 1]
    assert level.p50_ms == pytest.approx(150) and level.max_ms == pytest.approx(200)
    nothing = summarize(1, 1, {"records": [], "issued": 0, "errors": {}}, {**work, "expert_usage": {}})
    assert nothing.requests == 0 and nothing.p99_ms is None and nothing.throughput_rps == 0


@pytest.mark.parametrize("plan, seconds, stopped_by", [
    ({"duration_s": 5.0, "max_requests": 100}, 5.0, "clock"),  # the clock ended it: the whole window counts
    ({"duration_s": 5.0, "max_requests": 2}, 4.7, "request budget"),  # the budget ended it: until the last answer
    ({"duration_s": 4.0, "max_requests": None}, 4.7, "clock"),  # answers after the deadline count too
])
def test_a_level_lasts_its_window_or_until_its_last_answer(plan, seconds, stopped_by):
    """Under CPU load the last answer of a timed level can come just before its deadline, the next
    request due just after: the level still offered load for its whole window."""
    child = {"records": [[0.0, 2.0, True], [2.1, 2.6, True]], "issued": 2, "errors": {}, "plan": plan}
    work = {"mean_batch_size": 1.0, "model_calls": 2, "expert_usage": {}}
    level = summarize(1, 1, child, work)
    assert level.seconds == pytest.approx(seconds) and level.throughput_rps == pytest.approx(2 / seconds)
    assert level.stopped_by == stopped_by
