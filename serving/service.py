"""The advmoe BentoML service: `bentoml serve` (bentofile.yaml) or `bentoml serve serving.service:AdvMoE`.

Three services, each a worker process, as in BentoML's inference-graph examples:
- `AdvMoE` (the API): decodes and checks requests, answers /predict, /attack_probe, GET /model_info;
- `AdvMoEModel`: the served model in its runtime, behind adaptive batching;
- `AdvMoEProbe`: gradients for the attack probe, on its own worker and threads so that probes
  never take the cores /predict runs on.
Settings: ADVMOE_* environment variables (serving/config.py), read once at start.
"""
from __future__ import annotations

import functools
import secrets
import time
from collections import deque
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import NotFound
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from advmoe.card import read_card

from .config import ATTACKS, ServingConfig
from .inputs import InputSpec, RequestError, from_images, from_npy, from_tensor
from .metrics import metrics
from .runtimes import load_runtime

CONFIG = ServingConfig.from_env()
IMBALANCE_WINDOW = 1024  # routed samples the imbalance gauge looks back over
# BentoML (1.4.40) recycles its client session to a dependency every 100 requests or 300 s by
# closing it with requests still in flight: under load those fail with 500. Never recycle.
NO_RECYCLING = {"max_requests": 2**62, "max_age": 10.0**12}
# A log line per request costs more than a small model's inference; /metrics counts requests.
QUIET = {"access": {"enabled": False}}


def stored_model(tag: str):
    """The BentoML model for `tag` from the local store (never fetched from anywhere)."""
    try:
        return bentoml.models.get(tag)
    except NotFound:
        raise NotFound(f"no BentoML model {tag!r} in the BentoML store (BENTOML_HOME); "
                       f"export one with `advmoe export CHECKPOINT --out DIR --format bento` (`make run` does it)"
                       ) from None


def split_outputs(outputs: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The model worker returns [logits | routing] as one array (one batchable output)."""
    outputs = np.asarray(outputs)
    return outputs[:, :num_classes], outputs[:, num_classes:].astype(np.int64)


@bentoml.service(name="advmoe-model", workers=1, traffic={"timeout": 60}, runner_connection=NO_RECYCLING,
                 logging=QUIET)
class AdvMoEModel:
    """The model behind BentoML's adaptive batching: requests that arrive while a batch runs are
    merged into the next one, up to ADVMOE_MAX_BATCH_SIZE inputs; the batcher waits for more only
    as long as its latency model says it pays (ADVMOE_MAX_LATENCY_MS is its budget, not a window)."""

    model_ref = bentoml.models.BentoModel(CONFIG.model_tag)  # `bentoml build` packs this model

    def __init__(self):
        folder = stored_model(CONFIG.model_tag).path
        self.runtime = load_runtime(folder, CONFIG)
        self.num_experts = read_card(folder).num_experts
        self.recent = deque()  # routing arrays of the last IMBALANCE_WINDOW samples
        self.recent_samples = 0

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def predict(self, inputs: np.ndarray) -> np.ndarray:
        logits, routing = self._run(inputs, "predict")
        self._count_experts(routing)
        return np.concatenate([logits, routing.astype(np.float32)], axis=1)

    @bentoml.api(batchable=True, max_batch_size=2 * CONFIG.probe_max_batch_size,
                 max_latency_ms=CONFIG.max_latency_ms)
    def probe(self, inputs: np.ndarray) -> np.ndarray:
        """The probe's clean and adversarial inputs, on the served runtime (not counted as traffic)."""
        logits, routing = self._run(inputs, "attack_probe")
        return np.concatenate([logits, routing.astype(np.float32)], axis=1)

    def _run(self, inputs: np.ndarray, endpoint: str):
        m = metrics()
        start = time.perf_counter()
        logits, routing = self.runtime(np.ascontiguousarray(inputs, dtype=np.float32))
        m.compute_seconds.labels(endpoint, self.runtime.name).observe(time.perf_counter() - start)
        m.batch_size.labels(endpoint).observe(len(inputs))
        return logits, routing

    def _count_experts(self, routing: np.ndarray) -> None:
        if routing.shape[1] == 0:
            return
        m, n = metrics(), routing.max(initial=0) + 1
        for layer in range(routing.shape[1]):
            for expert, count in enumerate(np.bincount(routing[:, layer], minlength=n)):
                if count:
                    m.expert_samples.labels(str(layer), str(expert)).inc(int(count))
        self.recent.append(routing)
        self.recent_samples += len(routing)
        while self.recent_samples - len(self.recent[0]) >= IMBALANCE_WINDOW:
            self.recent_samples -= len(self.recent.popleft())
        window = np.concatenate(self.recent)
        experts = max(self.num_experts, n)
        for layer in range(window.shape[1]):
            share = np.bincount(window[:, layer], minlength=experts).max() / len(window)
            m.imbalance.labels(str(layer)).set(float(share * experts))


@bentoml.service(name="advmoe-probe", workers=1, traffic={"timeout": CONFIG.probe_timeout_s + 30},
                 runner_connection=NO_RECYCLING, logging=QUIET)
class AdvMoEProbe:
    """Adversarial examples for /attack_probe: the eager model (masked execution, straight-through
    router) on ADVMOE_PROBE_THREADS threads. Loaded on the first probe, so a server with probes
    disabled pays nothing for it."""

    def __init__(self):
        self.model = None

    def _load(self):
        import torch

        import advmoe

        torch.set_num_threads(CONFIG.probe_threads)
        model = advmoe.load_checkpoint(stored_model(CONFIG.model_tag).path)
        advmoe.set_execution(model, "masked")
        self.model = model.eval()

    @bentoml.api
    def attack(self, inputs: np.ndarray, labels: list[int], attack: str, eps: float, steps: int,
               step_size: float | None = None) -> dict:
        import torch

        from .probe import bounded_attack

        if self.model is None:
            self._load()
        start = time.perf_counter()
        result = bounded_attack(self.model, torch.from_numpy(np.asarray(inputs, np.float32)), torch.tensor(labels),
                                attack, eps, steps, step_size, CONFIG.probe_timeout_s)
        metrics().compute_seconds.labels("attack_probe", "torch").observe(time.perf_counter() - start)
        return {"adversarial": result.adversarial.numpy(), "steps_run": result.steps_run,
                "time_capped": result.time_capped}


def client_errors(endpoint: str):
    """A RequestError becomes its 4xx with {"error": message} and counts as a rejected request."""

    def decorate(func):
        @functools.wraps(func)
        async def wrapper(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            except RequestError as e:
                metrics().rejected.labels(endpoint, e.reason).inc()
                if "ctx" in kwargs:  # BentoML sets the status from the context when the API takes one
                    kwargs["ctx"].response.status_code = e.status
                return JSONResponse({"error": e.message}, status_code=e.status)

        return wrapper

    return decorate


async def model_info_route(request: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().info)


@bentoml.service(name="advmoe", workers=1, traffic={"timeout": 60}, labels={"project": "advmoe"}, logging=QUIET)
class AdvMoE:
    model = bentoml.depends(AdvMoEModel)
    prober = bentoml.depends(AdvMoEProbe)

    def __init__(self):
        stored = stored_model(CONFIG.model_tag)
        card = read_card(stored.path)
        channels, size, _ = card.input_shape
        self.spec = InputSpec(channels, size, CONFIG.max_batch_size, CONFIG.max_image_pixels)
        self.probe_spec = InputSpec(channels, size, CONFIG.probe_max_batch_size, CONFIG.max_image_pixels)
        self.num_classes = card.num_classes
        self.classes = list(card.classes)
        self.probes_running = 0
        # GET /model_info: the model card plus how this server serves it.
        self.info = {
            "tag": str(stored.tag),
            **card.to_dict(),
            "runtime": CONFIG.runtime,
            "execution": "sparse" if CONFIG.runtime != "torch" else CONFIG.execution,
            "max_batch_size": CONFIG.max_batch_size,
            "attack_probe": {"enabled": CONFIG.probe_enabled, "token_required": bool(CONFIG.probe_token),
                             "attacks": list(ATTACKS), "max_eps": CONFIG.probe_max_eps,
                             "max_steps": CONFIG.probe_max_steps, "max_batch_size": CONFIG.probe_max_batch_size,
                             "timeout_s": CONFIG.probe_timeout_s},
        }

    def _batch(self, inputs, images: list[Path], tensor: Path | None, spec: InputSpec) -> np.ndarray:
        given = [name for name, value in (("inputs", inputs), ("images", images or None), ("tensor", tensor))
                 if value is not None]
        if len(given) != 1:
            raise RequestError(400, "no_input" if not given else "ambiguous_input",
                               "send exactly one of: `images` (PNG/JPEG files, multipart), `inputs` (JSON array "
                               f"{spec.shape} in [0, 1]) or `tensor` (a .npy file); got "
                               f"{', '.join(given) or 'none'}")
        if inputs is not None:
            return from_tensor(inputs, spec)
        if tensor is not None:
            return from_npy(tensor, spec)
        return from_images(images, spec)

    def _top(self, logits: np.ndarray, k: int) -> list[list[dict]]:
        z = logits - logits.max(1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[{"class": self.classes[c], "index": int(c), "probability": float(p[c])} for c in row]
                for row, p in zip(order, probs)]

    @bentoml.api
    @client_errors("predict")
    async def predict(self, inputs: list | None = None, images: list[Path] = [], tensor: Path = None,
                      top_k: int = 1, return_experts: bool = False) -> dict:
        """Classify images (PNG/JPEG files, resized and converted as the model needs), a JSON array
        [B, C, H, W] in [0, 1] or a .npy file. Per input: the top_k classes with probabilities and,
        with return_experts, the expert chosen at each MoE layer."""
        if not 1 <= top_k <= self.num_classes:
            raise RequestError(400, "bad_top_k", f"top_k={top_k}: must be between 1 and {self.num_classes}")
        x = self._batch(inputs, images, tensor, self.spec)
        logits, routing = split_outputs(await self.model.to_async.predict(x), self.num_classes)
        predictions = [{"top_k": top} for top in self._top(logits, top_k)]
        if return_experts:
            for prediction, route in zip(predictions, routing):
                prediction["experts"] = route.tolist()
        # A Response goes out as is: BentoML would otherwise rebuild the output's JSON schema per request.
        return JSONResponse({"predictions": predictions})

    def _check_probe_access(self, ctx: bentoml.Context) -> None:
        if not CONFIG.probe_enabled:
            raise RequestError(404, "probe_disabled", "/attack_probe is disabled on this server "
                                                      "(start it with ADVMOE_PROBE_ENABLED=1)")
        if CONFIG.probe_token:
            header = ctx.request.headers.get("authorization", "")
            if not header:
                raise RequestError(401, "probe_unauthorized", "/attack_probe needs `Authorization: Bearer <token>`")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), CONFIG.probe_token):
                raise RequestError(403, "probe_forbidden", "the probe token is wrong")

    def _check_probe_caps(self, attack: str, eps: float, steps: int, labels: list[int], n: int) -> None:
        if attack not in ATTACKS:
            raise RequestError(400, "bad_attack", f"attack={attack!r}: choose one of {', '.join(ATTACKS)}")
        if not 0 < eps <= CONFIG.probe_max_eps:
            hint = f" (did you mean {eps:g}/255 = {eps / 255:.4f}?)" if eps > 1 else ""
            raise RequestError(400, "bad_eps", f"eps={eps:g}: must be in (0, {CONFIG.probe_max_eps:.4g}] "
                                               f"(L-inf, pixels in [0, 1]){hint}")
        if not 1 <= steps <= CONFIG.probe_max_steps:
            raise RequestError(400, "bad_steps", f"steps={steps}: must be between 1 and {CONFIG.probe_max_steps}")
        if len(labels) != n:
            raise RequestError(400, "bad_labels", f"{len(labels)} labels for {n} inputs: give one label per input")
        if any(not 0 <= label < self.num_classes for label in labels):
            raise RequestError(400, "bad_labels", f"labels must be class indices in [0, {self.num_classes})")

    @bentoml.api
    @client_errors("attack_probe")
    async def attack_probe(self, ctx: bentoml.Context, labels: list[int], inputs: list | None = None,
                           images: list[Path] = [], tensor: Path = None, attack: str = "pgd",
                           eps: float = 8 / 255, steps: int = 10, step_size: float | None = None,
                           return_adversarial: bool = False) -> dict:
        """Attack the served model on the given inputs and labels (FGSM or PGD, L-inf, capped by the
        server) and report, per input, clean and adversarial predictions, whether the prediction
        and the route flipped, and the perturbation's size. Off unless ADVMOE_PROBE_ENABLED=1."""
        self._check_probe_access(ctx)
        x = self._batch(inputs, images, tensor, self.probe_spec)
        self._check_probe_caps(attack, eps, steps, labels, len(x))
        if self.probes_running >= CONFIG.probe_concurrency:
            raise RequestError(429, "probe_busy", f"{self.probes_running} probe(s) already running (the limit is "
                                                  f"{CONFIG.probe_concurrency}); retry later")
        self.probes_running += 1
        try:
            result = await self.prober.to_async.attack(inputs=x, labels=list(labels), attack=attack, eps=eps,
                                                       steps=steps, step_size=step_size)
            adversarial = np.asarray(result["adversarial"], dtype=np.float32)
            outputs = await self.model.to_async.probe(np.concatenate([x, adversarial]))
        finally:
            self.probes_running -= 1
        logits, routing = split_outputs(outputs, self.num_classes)
        n = len(x)
        clean, adv = logits[:n].argmax(1), logits[n:].argmax(1)
        route_flips = (routing[:n] != routing[n:]).any(1) if routing.shape[1] else np.zeros(n, bool)
        delta = (adversarial - x).reshape(n, -1)
        results = []
        for i in range(n):
            item = {"label": int(labels[i]), "clean": self.classes[clean[i]], "clean_index": int(clean[i]),
                    "adversarial": self.classes[adv[i]], "adversarial_index": int(adv[i]),
                    "prediction_flipped": bool(clean[i] != adv[i]), "route_flipped": bool(route_flips[i]),
                    "linf": float(np.abs(delta[i]).max()), "l2": float(np.linalg.norm(delta[i]))}
            if routing.shape[1]:
                item["experts_clean"], item["experts_adversarial"] = routing[i].tolist(), routing[n + i].tolist()
            if return_adversarial:
                item["adversarial_image"] = adversarial[i].tolist()
            results.append(item)
        m = metrics()
        m.probe_requests.labels(attack).inc()
        m.probe_samples.labels(attack).inc(n)
        m.probe_prediction_flips.labels(attack).inc(int((clean != adv).sum()))
        m.probe_route_flips.labels(attack).inc(int(route_flips.sum()))
        return JSONResponse({
            "attack": attack, "eps": eps, "steps_requested": 1 if attack == "fgsm" else steps,
            "steps_run": result["steps_run"], "time_capped": result["time_capped"],
            "clean_accuracy": float((clean == np.asarray(labels)).mean()),
            "adversarial_accuracy": float((adv == np.asarray(labels)).mean()), "results": results})


class BodyLimit:
    """413 for a request body over ADVMOE_MAX_BODY_BYTES, from its Content-Length or, when the
    body is chunked, as soon as the bytes read pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._reject(scope, send)
            return await self.app(scope, receive, send)
        # No length given (chunked): read the body up to the limit, then hand it on.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._reject(scope, send)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, send):
        metrics().rejected.labels(scope.get("path", "").strip("/") or "/", "body_too_large").inc()
        response = JSONResponse({"error": f"request body over {self.max_bytes} bytes; send fewer or smaller inputs"},
                                status_code=413)
        await response(scope, None, send)


AdvMoE.add_asgi_middleware(BodyLimit, max_bytes=CONFIG.max_body_bytes)
AdvMoE.mount_asgi_app(Starlette(routes=[Route("/model_info", model_info_route, methods=["GET"])]), path="/")
