"""Load-test a running advmoe server: ramp the concurrency, measure each level, write a report.

    from clients.loadtest import run_loadtest
    result = run_loadtest("http://127.0.0.1:3000", concurrency=(1, 8, 32, 64), duration_s=10)
    result.levels[-1].throughput_rps, result.levels[-1].p99_ms, result.to_dict()
    result.write("reports/loadtest")          # loadtest.json + loadtest.md
    run_level(url, 32, duration_s=10, images=[png_bytes, ...])   # one level, as a dict

Each level runs locust (clients/locustfile.py) in a child process, with as many users as the
concurrency, each keeping one request in flight; it stops after `duration_s` or `max_requests`
requests, whichever comes first (the child is killed if it overruns its time bound). Latency
percentiles come from every request's own timing; the mean adaptive batch size and the expert
usage from the server's /metrics before and after the level (so other traffic to the same server
during a level counts too). Loopback targets only, unless allow_remote=True.

This process never imports locust (which patches the standard library with gevent), torch, nor
anything from serving/: it talks to the server over HTTP.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

import httpx
import numpy as np

from advmoe.usage import share_of_counts

from .client import Client, ModelInfo

ROOT = Path(__file__).resolve().parent.parent  # where `clients` imports from
PAYLOAD_NAMES = {"images": "PNG files (multipart)", "npy": "one .npy tensor (multipart)", "json": "a JSON array"}
PNG_MAGIC = b"\x89PNG"
SPAWN_S = 60.0  # a child's time to import locust and spawn its users, on a busy machine


class LoadTestError(RuntimeError):
    pass


def require_loopback(url: str, allow_remote: bool = False) -> str:
    """The URL, if its host is this machine (or allow_remote); else a ValueError that says how."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname
    if not host:
        raise ValueError(f"{url!r}: give the server's URL, e.g. http://127.0.0.1:3000")
    if allow_remote or _is_loopback(host):
        return url
    raise ValueError(f"{url}: load tests target this machine only (127.0.0.1, ::1, localhost); pass --allow-remote "
                     f"(allow_remote=True) to load a server on another host that you are allowed to load")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


# -- /metrics ---------------------------------------------------------------------------------

def scrape(url: str, timeout_s: float = 10.0) -> dict[tuple, float]:
    """Every sample on the server's /metrics: {(name, sorted label pairs): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=timeout_s).raise_for_status().text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def settled_scrape(url: str, moe: bool = True, deadline_s: float = 5.0) -> dict[tuple, float]:
    """/metrics once a MoE model's expert counts have caught up with its work: the server sends them
    every half second or so, so each layer's routed samples equal /predict's inputs once they are
    in. After `deadline_s`, the last scrape; a dense model's (moe=False) at once."""
    deadline = time.monotonic() + deadline_s
    while True:
        samples = scrape(url)
        inputs = samples.get(("advmoe_batch_size_sum", (("endpoint", "predict"),)), 0.0)
        routed: dict[str, float] = {}
        for (name, labels), value in samples.items():
            if name == "advmoe_expert_routed_samples_total":
                layer = dict(labels)["layer"]
                routed[layer] = routed.get(layer, 0.0) + value
        caught_up = all(total == inputs for total in routed.values()) and (routed or not inputs)
        if not moe or caught_up or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def _grown(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def served_work(before: dict, after: dict) -> dict:
    """What the model did between two scrapes: model calls and inputs on /predict (adaptive
    batching) and the samples routed to each expert of each MoE layer."""
    calls = _grown(before, after, "advmoe_batch_size_count", endpoint="predict")
    inputs = _grown(before, after, "advmoe_batch_size_sum", endpoint="predict")
    usage: dict[str, dict[str, int]] = {}
    for name, labels in after:
        if name == "advmoe_expert_routed_samples_total":
            grown = _grown(before, after, name, **dict(labels))
            if grown:
                layer, expert = dict(labels)["layer"], dict(labels)["expert"]
                usage.setdefault(layer, {})[expert] = int(grown)
    usage = {layer: dict(sorted(experts.items(), key=lambda kv: int(kv[0])))
             for layer, experts in sorted(usage.items(), key=lambda kv: int(kv[0]))}
    return {"model_calls": int(calls), "model_inputs": int(inputs),
            "mean_batch_size": inputs / calls if calls else None, "expert_usage": usage}


def expert_share(usage: dict[str, dict[str, int]], num_experts: int = 0) -> list[float]:
    """Share of the routed samples each expert got, over all MoE layers (one entry per expert,
    at least num_experts of them)."""
    totals: dict[int, int] = {}
    for experts in usage.values():
        for expert, count in experts.items():
            totals[int(expert)] = totals.get(int(expert), 0) + count
    return share_of_counts(totals, num_experts)


# -- results ----------------------------------------------------------------------------------

@dataclass
class LevelResult:
    concurrency: int  # users, each with one request in flight
    requests: int  # sent in the level
    errors: int  # failed: no answer, a non-200 status, or an answer without the predictions
    error_rate: float
    seconds: float  # the level's window, or until its last answer if that came later (or the budget ended it)
    images: int  # inputs in the successful requests
    throughput_rps: float  # successful requests per second
    images_per_s: float  # successful inputs per second
    p50_ms: float | None  # latency percentiles, mean and max over the successful requests (None: none)
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    mean_batch_size: float | None  # inputs per model call after adaptive batching (/metrics; None: no call)
    model_calls: int
    expert_usage: dict[str, dict[str, int]]  # MoE layer -> expert -> samples routed (/metrics)
    expert_share: list[float]  # per expert, over all layers
    error_messages: dict[str, int] = field(default_factory=dict)
    spawned_users: int = 0
    stopped_by: str = "clock"  # "clock" (duration_s ran out) or "request budget" (max_requests sent)


@dataclass
class LoadTestResult:
    url: str
    model: dict  # the server's /model_info
    settings: dict  # concurrency, duration_s, max_requests, payload, batch_size, top_k, inputs, ...
    machine: dict
    levels: list[LevelResult]
    locust_version: str | None = None
    started: str = ""

    @property
    def errors(self) -> int:
        return sum(level.errors for level in self.levels)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        model, s = self.model, self.settings
        budget = f", at most {s['max_requests']} requests" if s.get("max_requests") else ""
        lines = [
            "# advmoe load test", "",
            f"- server: {self.url}, model `{model.get('architecture')}` ({model.get('tag')}), "
            f"{model.get('num_experts') or 'no'} experts, runtime {model.get('runtime')}, "
            f"{model.get('execution')} execution, max batch {model.get('max_batch_size')}",
            f"- each request: {s['batch_size']} input(s) of shape {model.get('input_shape')} as "
            f"{PAYLOAD_NAMES[s['payload']]}, top_k={s['top_k']}; inputs: {s['inputs']}",
            f"- each level: {s['duration_s']:g} s{budget}; closed loop (each user keeps one request in flight), "
            f"after {s['warmup_requests']} warm-up requests",
            f"- load generator: locust {self.locust_version} on {self.machine['cpus']} CPUs"
            + (" (the same machine as the server: the client's CPU time is taken from the server)"
               if self.machine.get("loopback") else ""),
            f"- started {self.started}", "",
            "| concurrency | requests | errors | seconds | stopped by | req/s | images/s | p50 ms | p95 ms | p99 ms | "
            "mean batch | expert share (0 / 1 / ...) |",
            "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.levels:
            batch = f"{r.mean_batch_size:.2f}" if r.mean_batch_size is not None else "n/a"
            share = " / ".join(f"{100 * x:.0f}" for x in r.expert_share) + " %" if r.expert_share else "n/a"
            lines.append(f"| {r.concurrency} | {r.requests} | {r.errors} ({100 * r.error_rate:.1f} %) | "
                         f"{r.seconds:.1f} | {r.stopped_by} | {r.throughput_rps:.1f} | {r.images_per_s:.1f} | "
                         f"{_ms(r.p50_ms)} | {_ms(r.p95_ms)} | {_ms(r.p99_ms)} | {batch} | {share} |")
        lines += ["", "mean batch: inputs per model call after adaptive batching (`advmoe_batch_size`); expert "
                      "share: samples routed to expert 0 / 1 / ... over all MoE layers "
                      "(`advmoe_expert_routed_samples_total`); both are /metrics deltas over the level."]
        failures = {m: n for r in self.levels for m, n in r.error_messages.items()}
        if failures:
            lines += ["", "## Errors", ""] + [f"- {n} x {m}" for m, n in sorted(failures.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path, name: str = "loadtest") -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / f"{name}.json", out / f"{name}.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        md_path.write_text(self.to_markdown())
        return json_path, md_path


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def summarize(concurrency: int, batch_size: int, child: dict, work: dict, num_experts: int = 0) -> LevelResult:
    records = np.asarray(child["records"], dtype=np.float64).reshape(-1, 3)  # start, latency, ok
    ok = records[:, 2] > 0
    ended = float((records[:, 0] + records[:, 1]).max()) if len(records) else 0.0
    good = records[ok, 1] * 1000
    latency = ({"p50_ms": np.percentile(good, 50), "p95_ms": np.percentile(good, 95),
                "p99_ms": np.percentile(good, 99), "mean_ms": good.mean(), "max_ms": good.max()} if len(good) else {})
    n_ok, n = int(ok.sum()), max(len(records), int(child.get("issued", 0)))
    plan = child.get("plan") or {}
    # When the clock, not the request budget, ended the level, load was offered for its whole
    # window: the last answer can come before the deadline (the next request was due just after
    # it), and that gap is part of the level.
    budget_spent = plan.get("max_requests") is not None and n >= plan["max_requests"]
    seconds = ended if budget_spent else max(ended, float(plan.get("duration_s", 0.0)))
    errors = dict(child["errors"])
    if n > len(records):  # still in flight when the level's hard stop came
        errors["no answer before the level's hard stop"] = n - len(records)
    return LevelResult(
        concurrency=concurrency, requests=n, errors=n - n_ok, error_rate=(n - n_ok) / n if n else 0.0,
        seconds=seconds, images=n_ok * batch_size, throughput_rps=n_ok / seconds if seconds else 0.0,
        images_per_s=n_ok * batch_size / seconds if seconds else 0.0,
        **{key: float(latency[key]) if latency else None for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms")},
        mean_batch_size=work["mean_batch_size"], model_calls=work["model_calls"], expert_usage=work["expert_usage"],
        expert_share=expert_share(work["expert_usage"], num_experts), error_messages=errors,
        spawned_users=child.get("spawned_users", 0), stopped_by="request budget" if budget_spent else "clock")


# -- running ----------------------------------------------------------------------------------

def run_child(plan: dict, workdir: Path, log_path: Path) -> dict:
    """One level in a locust child process, killed if it overruns its bound."""
    plan_path, result_path = workdir / "plan.json", workdir / "result.json"
    plan_path.write_text(json.dumps(plan))
    result_path.unlink(missing_ok=True)
    bound = SPAWN_S + plan["duration_s"] + plan["request_timeout_s"] + 10
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "wb") as log:
        try:
            code = subprocess.run([sys.executable, "-m", "clients.locustfile", str(plan_path), str(result_path)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=bound).returncode
        except subprocess.TimeoutExpired:
            raise LoadTestError(f"the locust process overran its {bound:.0f} s bound and was killed{_tail(log_path)}")
    if code != 0 or not result_path.is_file():
        raise LoadTestError(f"the locust process exited with code {code} without results{_tail(log_path)}")
    return json.loads(result_path.read_text())


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").strip().splitlines()[-lines:] if path.is_file() else []
    return ("; its log ends with:\n" + "\n".join(text)) if text else ""


def _load_inputs(inputs, shape) -> np.ndarray | None:
    if inputs is None:
        return None
    x = np.load(inputs, allow_pickle=False) if isinstance(inputs, (str, Path)) else np.asarray(inputs)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape) or len(x) == 0:
        raise ValueError(f"inputs of shape {list(x.shape)}: the server's model takes [N, {', '.join(map(str, shape))}]")
    if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise ValueError("inputs must be pixels in [0, 1] (divide 8-bit values by 255)")
    return x


@dataclass
class _Prepared:
    url: str
    info: ModelInfo
    plan: dict  # the locust plan of every level, but for its users
    inputs: str  # what the requests carry, in words


def _prepare(url: str, workdir: Path, *, duration_s: float, max_requests: int | None, payload: str, batch_size: int,
             top_k: int, inputs, images, warmup_requests: int, request_timeout_s: float, ready_timeout_s: float,
             allow_remote: bool) -> _Prepared:
    """Check the settings and the server (an advmoe service, answering), write the inputs for the
    locust process into workdir and warm the server up with them."""
    url = require_loopback(url, allow_remote).rstrip("/")
    if importlib.util.find_spec("locust") is None:
        raise LoadTestError("locust is not installed: pip install -e '.[loadtest]' (or '.[dev]')")
    if duration_s <= 0 or (max_requests is not None and max_requests < 1):
        raise ValueError("duration_s must be positive and max_requests at least 1")
    if payload not in PAYLOAD_NAMES:
        raise ValueError(f"payload {payload!r}: choose one of {', '.join(PAYLOAD_NAMES)}")
    if images is not None and (inputs is not None or payload != "images" or not len(images)):
        raise ValueError("images (encoded PNG/JPEG files) go with payload='images' and without inputs")
    with Client(url, ready_timeout_s=ready_timeout_s, timeout_s=request_timeout_s) as client:
        info, url = client.model_info, client.url
        if not 1 <= batch_size <= info.max_batch_size:
            raise ValueError(f"batch_size {batch_size}: the server takes 1 to {info.max_batch_size} inputs a request")
        plan = {"url": url, "input_shape": list(info.input_shape), "duration_s": float(duration_s),
                "max_requests": max_requests, "payload": payload, "batch_size": batch_size, "top_k": top_k,
                "request_timeout_s": request_timeout_s, "inputs_path": None, "image_paths": None}
        if images is not None:
            plan["image_paths"] = [str(workdir / f"image-{i}.{'png' if data.startswith(PNG_MAGIC) else 'jpg'}")
                                   for i, data in enumerate(images)]
            for path, data in zip(plan["image_paths"], images):
                Path(path).write_bytes(data)
            warm, described = [plan["image_paths"][i % len(images)] for i in range(batch_size)], \
                f"{len(images)} given image files"
        else:
            given = _load_inputs(inputs, info.input_shape)
            if given is None:
                warm, described = np.random.default_rng(1).random((batch_size, *info.input_shape), np.float32), \
                    "uniform noise"
            else:
                plan["inputs_path"] = str(workdir / "inputs.npy")
                np.save(plan["inputs_path"], given)
                warm = given[np.arange(batch_size) % len(given)]
                described = f"{inputs} ({len(given)})" if isinstance(inputs, (str, Path)) else \
                    f"an array of {len(given)}"
        for _ in range(warmup_requests):
            client.predict(warm, top_k=top_k, experts=False)
    return _Prepared(url, info, plan, described)


def _measure(prepared: _Prepared, users: int, workdir: Path, log_path: Path) -> tuple[LevelResult, dict]:
    plan = {**prepared.plan, "users": users}
    moe = bool(prepared.info.num_experts)
    before = settled_scrape(plan["url"], moe)
    child = run_child(plan, workdir, log_path)
    work = served_work(before, settled_scrape(plan["url"], moe))
    return summarize(users, plan["batch_size"], child, work, prepared.info.num_experts), child


def run_level(url: str, concurrency: int, duration_s: float = 10.0, images: Sequence[bytes] | None = None, *,
              max_requests: int | None = None, payload: str = "images", batch_size: int = 1, top_k: int = 1,
              inputs: np.ndarray | str | Path | None = None, warmup_requests: int = 4,
              request_timeout_s: float = 60.0, ready_timeout_s: float = 30.0, allow_remote: bool = False,
              log_path: str | Path | None = None) -> dict:
    """One level against the advmoe server at `url`: `concurrency` users for `duration_s` (and at
    most `max_requests` requests). `images`: encoded PNG/JPEG files to send in turn (else
    `inputs`, else uniform noise). Returns the LevelResult as a dict."""
    with tempfile.TemporaryDirectory(prefix="advmoe-loadtest-") as tmp:
        prepared = _prepare(url, Path(tmp), duration_s=duration_s, max_requests=max_requests, payload=payload,
                            batch_size=batch_size, top_k=top_k, inputs=inputs, images=images,
                            warmup_requests=warmup_requests, request_timeout_s=request_timeout_s,
                            ready_timeout_s=ready_timeout_s, allow_remote=allow_remote)
        level, _ = _measure(prepared, int(concurrency), Path(tmp), Path(log_path or Path(tmp) / "locust.log"))
    return asdict(level)


def run_loadtest(url: str, concurrency: Sequence[int] = (1, 8, 32, 64), duration_s: float = 10.0,
                 max_requests: int | None = None, *, payload: str = "images", batch_size: int = 1, top_k: int = 1,
                 inputs: np.ndarray | str | Path | None = None, images: Sequence[bytes] | None = None,
                 warmup_requests: int = 4, request_timeout_s: float = 60.0, ready_timeout_s: float = 30.0,
                 allow_remote: bool = False, out_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> LoadTestResult:
    """Ramp through the concurrency levels against the advmoe server at `url` and measure each.
    `max_requests` bounds each level, `duration_s` too; the result has one LevelResult per level.
    What the requests carry: `images` (encoded PNG/JPEG files), else `inputs` (an array
    [N, C, H, W] in [0, 1] or a .npy file of one, e.g. test images: the routing, and so the cost of
    sparse execution, depends on them), else uniform noise; each sent in turn.
    With out_dir: loadtest.json, loadtest.md and the locust logs go there."""
    levels = [int(c) for c in concurrency]
    if not levels or min(levels) < 1:
        raise ValueError(f"concurrency {list(concurrency)}: give levels of at least 1 user")
    say = log or (lambda message: None)
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    results, locust_version = [], None
    with tempfile.TemporaryDirectory(prefix="advmoe-loadtest-") as tmp:
        prepared = _prepare(url, Path(tmp), duration_s=duration_s, max_requests=max_requests, payload=payload,
                            batch_size=batch_size, top_k=top_k, inputs=inputs, images=images,
                            warmup_requests=warmup_requests, request_timeout_s=request_timeout_s,
                            ready_timeout_s=ready_timeout_s, allow_remote=allow_remote)
        logs = Path(out_dir) if out_dir else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for users in levels:
            say(f"concurrency {users}: {duration_s:g} s" + (f", at most {max_requests} requests" if max_requests else ""))
            level, child = _measure(prepared, users, Path(tmp), logs / f"locust-c{users}.log")
            locust_version = child.get("locust_version")
            batch = "n/a" if level.mean_batch_size is None else f"{level.mean_batch_size:.2f}"
            say(f"  {level.requests} requests, {level.errors} errors, {level.throughput_rps:.1f} req/s, "
                f"p50 {_ms(level.p50_ms)} ms, p99 {_ms(level.p99_ms)} ms, mean batch {batch}")
            results.append(level)
    settings = {"concurrency": levels, "duration_s": float(duration_s), "max_requests": max_requests,
                "payload": payload, "batch_size": batch_size, "top_k": top_k, "inputs": prepared.inputs,
                "warmup_requests": warmup_requests, "request_timeout_s": request_timeout_s}
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "loopback": _is_loopback(urlsplit(prepared.url).hostname)}
    result = LoadTestResult(url=prepared.url, model=prepared.info.raw, settings=settings, machine=machine,
                            levels=results, locust_version=locust_version, started=started)
    if out_dir:
        result.write(out_dir)
    return result
