"""A headless locust load on the advmoe service's POST /predict.

By hand (the payload is sized from GET /model_info; loopback hosts only, unless
ADVMOE_LOADTEST_ALLOW_REMOTE=1):

    locust -f clients/locustfile.py --headless -u 8 -r 8 -t 10s --host http://127.0.0.1:3000
    # ADVMOE_LOADTEST_PAYLOAD=images|npy|json  ADVMOE_LOADTEST_BATCH=1  ADVMOE_LOADTEST_MAX_REQUESTS=N

From `advmoe loadtest` (clients/loadtest.py): `python -m clients.locustfile PLAN.json RESULT.json`
runs one concurrency level with locust as a library, in a process of its own (locust patches the
standard library with gevent, which must not happen in a process that runs asyncio or torch). The
users wait until all of them are spawned, then each sends one request at a time (closed loop: the
concurrency is the number of requests in flight) until the duration or the request budget is
spent; requests in flight then finish, and every request's start and latency go to RESULT.json.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass

import gevent
import gevent.event
import numpy as np
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

from clients.loadtest import require_loopback

PAYLOADS = ("images", "npy", "json")
BOUNDARY = "advmoe-loadtest-9c1f2e7d"


@dataclass
class Plan:
    """One concurrency level: where, what and how long (the JSON file `advmoe loadtest` writes)."""
    url: str
    input_shape: tuple[int, int, int]  # C, H, W of the served model
    users: int = 1
    duration_s: float = 10.0
    max_requests: int | None = None  # at most this many requests in the level
    payload: str = "images"
    batch_size: int = 1  # inputs per request
    top_k: int = 1
    request_timeout_s: float = 60.0
    seed: int = 0
    distinct_bodies: int = 16  # request bodies made up front and cycled through
    inputs_path: str | None = None  # a .npy [N, C, H, W] in [0, 1] to send; None: uniform noise
    image_paths: list[str] | None = None  # encoded PNG/JPEG files to send as they are (payload "images")


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes, str]]) -> tuple[bytes, dict]:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    for name, filename, data, content_type in files:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f'Content-Type: {content_type}\r\n\r\n'.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    pixels = (image * 255).round().astype(np.uint8)  # [C, H, W]
    picture = Image.fromarray(pixels[0], "L") if len(pixels) == 1 else Image.fromarray(pixels.transpose(1, 2, 0), "RGB")
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def batches(plan: Plan) -> list[np.ndarray]:
    """The inputs of each distinct body: the given inputs in turn, or uniform noise."""
    if plan.inputs_path is None:
        rng = np.random.default_rng(plan.seed)
        return [rng.random((plan.batch_size, *plan.input_shape), dtype=np.float32)
                for _ in range(plan.distinct_bodies)]
    inputs = np.load(plan.inputs_path, allow_pickle=False).astype(np.float32)
    return [inputs[chunk] for chunk in in_turn(len(inputs), plan.batch_size)]


def in_turn(n: int, batch_size: int, most: int = 64) -> list[list[int]]:
    """Indices of n items, batch_size a body, wrapping around: enough bodies to send each item
    once (at most `most` bodies)."""
    count = max(1, min(most, -(-n // batch_size)))
    return [[(i * batch_size + j) % n for j in range(batch_size)] for i in range(count)]


def image_bodies(plan: Plan, fields: dict[str, str]) -> list[tuple[bytes, dict]]:
    """The given image files, batch_size a request, each sent in turn."""
    files = []
    for path in plan.image_paths:
        with open(path, "rb") as f:
            data = f.read()
        kind = "png" if data.startswith(b"\x89PNG") else "jpeg"
        files.append(("images", os.path.basename(path), data, f"image/{kind}"))
    return [multipart(fields, [files[i] for i in chunk]) for chunk in in_turn(len(files), plan.batch_size)]


def make_bodies(plan: Plan) -> list[tuple[bytes, dict]]:
    """The inputs encoded as the chosen payload."""
    if plan.payload not in PAYLOADS:
        raise ValueError(f"payload {plan.payload!r}: choose one of {', '.join(PAYLOADS)}")
    fields = {"top_k": str(plan.top_k), "return_experts": "false"}
    if plan.image_paths:
        return image_bodies(plan, fields)
    bodies = []
    for x in batches(plan):
        if plan.payload == "images":
            bodies.append(multipart(fields, [("images", f"{i}.png", png(image), "image/png")
                                             for i, image in enumerate(x)]))
        elif plan.payload == "npy":
            buffer = io.BytesIO()
            np.save(buffer, x)
            bodies.append(multipart(fields, [("tensor", "x.npy", buffer.getvalue(), "application/octet-stream")]))
        else:
            bodies.append((json.dumps({"inputs": x.round(4).tolist(), "top_k": plan.top_k}).encode(),
                           {"Content-Type": "application/json"}))
    return bodies


class Run:
    """Shared by the users of one process: the bodies, the budget, the window and the records."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.bodies = make_bodies(plan)
        self.opened = gevent.event.Event()
        self.start = self.deadline = math.inf
        self.issued = self.in_flight = 0
        self.records: list[tuple[float, float, bool]] = []  # (start after the window opened, latency, ok) in s
        self.errors: Counter[str] = Counter()

    def open(self, duration_s: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + duration_s
        self.opened.set()

    def spent(self) -> bool:
        budget = self.plan.max_requests
        return time.perf_counter() >= self.deadline or (budget is not None and self.issued >= budget)

    def take(self) -> tuple[bytes, dict] | None:
        """The next request's body, or None once the time or the request budget is spent."""
        self.opened.wait()
        if self.spent():
            return None
        body = self.bodies[self.issued % len(self.bodies)]
        self.issued += 1
        self.in_flight += 1
        return body

    def record(self, started: float, latency: float, error: str | None) -> None:
        self.in_flight -= 1
        self.records.append((started - self.start, latency, error is None))
        if error:
            self.errors[error] += 1

    def finished(self) -> bool:
        return self.spent() and self.in_flight == 0

    def result(self) -> dict:
        import locust

        return {"plan": asdict(self.plan), "issued": self.issued, "records": self.records,
                "errors": dict(self.errors), "locust_version": locust.__version__}


RUN: Run | None = None


def check(response, batch_size: int) -> str | None:
    """None for a good answer, else a short description of what went wrong."""
    if response.status_code == 0:  # no answer: refused, reset or timed out
        return f"{type(response.error).__name__}: {response.error}"[:200]
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {(response.text or '')[:200]}"
    try:
        predictions = response.json()["predictions"]
    except (ValueError, KeyError, TypeError):
        return "HTTP 200 without predictions"
    if len(predictions) != batch_size:
        return f"HTTP 200 with {len(predictions)} predictions for {batch_size} inputs"
    return None


class PredictUser(FastHttpUser):
    """One request in flight at a time, back to back."""
    wait_time = constant(0)
    max_retries = 0

    @task
    def predict(self):
        run = RUN
        body = run.take() if run else None
        if body is None:
            raise StopUser()
        data, headers = body
        started = time.perf_counter()
        with self.client.post("/predict", data=data, headers=headers, name="/predict",
                              catch_response=True) as response:
            latency = time.perf_counter() - started
            error = check(response, run.plan.batch_size)
            if error:
                response.failure(error)
            else:
                response.success()
        run.record(started, latency, error)


@events.test_start.add_listener
def _plan_from_the_server(environment, **_):
    """`locust -f clients/locustfile.py`: size the payload from /model_info; locust's -t stops it."""
    global RUN
    if RUN is not None:
        return
    url = (environment.host or "").rstrip("/")
    require_loopback(url, os.environ.get("ADVMOE_LOADTEST_ALLOW_REMOTE") == "1")
    with urllib.request.urlopen(f"{url}/model_info", timeout=30) as answer:
        info = json.load(answer)
    budget = os.environ.get("ADVMOE_LOADTEST_MAX_REQUESTS")
    RUN = Run(Plan(url=url, input_shape=tuple(info["input_shape"]),
                   payload=os.environ.get("ADVMOE_LOADTEST_PAYLOAD", "images"),
                   batch_size=int(os.environ.get("ADVMOE_LOADTEST_BATCH", "1")),
                   max_requests=int(budget) if budget else None))
    RUN.open(math.inf)


def run_level(plan: Plan) -> dict:
    """Run one level with locust as a library (this process gets gevent's patches) and return
    the records. Bounded: spawning, the duration, then at most request_timeout_s for the
    requests in flight."""
    from locust.env import Environment

    global RUN
    RUN = Run(plan)  # the parent process checked the host (loopback, or --allow-remote)
    user = type("PredictUser", (PredictUser,), {"network_timeout": plan.request_timeout_s,
                                                 "connection_timeout": min(10.0, plan.request_timeout_s)})
    environment = Environment(user_classes=[user], host=plan.url)
    runner = environment.create_local_runner()
    spawned = 0
    try:
        runner.start(plan.users, spawn_rate=min(100, max(plan.users, 1) * 10))
        spawn_deadline = time.perf_counter() + 30
        while runner.user_count < plan.users and time.perf_counter() < spawn_deadline:
            gevent.sleep(0.01)
        spawned = runner.user_count
        RUN.open(plan.duration_s)
        hard_stop = RUN.deadline + plan.request_timeout_s + 1
        while not RUN.finished() and time.perf_counter() < hard_stop:
            gevent.sleep(0.01)
    finally:
        runner.quit()
    return {**RUN.result(), "spawned_users": spawned}


def main(argv: list[str] | None = None) -> int:
    plan_path, result_path = argv if argv is not None else sys.argv[1:]
    with open(plan_path) as f:
        raw = json.load(f)
    plan = Plan(**{**raw, "input_shape": tuple(raw["input_shape"])})
    result = run_level(plan)
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
