"""The advmoe BentoML service: `bentoml serve` (bentofile.yaml) or `bentoml serve serving.service:AdvMoE`.

- `AdvMoE`: decodes and checks each request and runs the model in the same worker, behind a
  batcher that merges the requests in flight (serving/batching.py): one process hop per request.
  Answers /predict, /attack_probe and GET /model_info.
- `AdvMoEProbe`: gradients for /attack_probe in a worker of its own, at a lower CPU priority, so
  that probes never take the cores from /predict; it is loaded on the first probe.
Settings: ADVMOE_* environment variables (serving/config.py), read once at start. Request parsing
and 4xx answers: serving/http.py; decoding: serving/inputs.py; the probe's answer:
serving/probe_report.py.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import NotFound
from fastapi import FastAPI
from starlette.responses import JSONResponse

from advmoe.card import read_card

from . import probe_report
from .config import ATTACKS, PROBE_NICENESS, ServingConfig
from .http import LenientInput, RequestGate, client_errors, single_file
from .inputs import InputSpec, RequestError, from_images, from_npy, from_tensor
from .metrics import metrics
from .model import ServedModel, top_classes
from .runtimes import load_runtime

CONFIG = ServingConfig.from_env()
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


class PredictInput(LenientInput):
    inputs: list | None = None
    images: list[Path] = []
    tensor: Path = None  # not Optional: BentoML's schema (and its clients) then take it for a file
    top_k: int = 1
    return_experts: bool = False


class ProbeInput(LenientInput):
    labels: list[int]
    inputs: list | None = None
    images: list[Path] = []
    tensor: Path = None  # not Optional: BentoML's schema (and its clients) then take it for a file
    attack: str = "pgd"
    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    return_adversarial: bool = False


@bentoml.service(name="advmoe-probe", workers=1, traffic={"timeout": CONFIG.probe_timeout_s + 30},
                 runner_connection=NO_RECYCLING, logging=QUIET)
class AdvMoEProbe:
    """Adversarial examples for /attack_probe: the eager model (masked execution, straight-through
    router) on ADVMOE_PROBE_THREADS threads, niced. Loaded on the first probe, so a server with
    probes disabled pays nothing for it."""

    def __init__(self):
        self.model = None
        os.nice(PROBE_NICENESS)

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
        result = bounded_attack(self.model, torch.from_numpy(np.array(inputs, np.float32)), torch.tensor(labels),
                                attack, eps, steps, step_size, CONFIG.probe_timeout_s)
        metrics().compute_seconds.labels("attack_probe", "torch").observe(time.perf_counter() - start)
        return {"adversarial": result.adversarial.numpy(), "steps_run": result.steps_run,
                "time_capped": result.time_capped}


routes = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # GET routes, listed in /docs.json


@bentoml.service(name="advmoe", workers=CONFIG.worker_count(), traffic={"timeout": 60}, labels={"project": "advmoe"},
                 runner_connection=NO_RECYCLING, logging=QUIET)
@bentoml.asgi_app(routes, path="/")
class AdvMoE:
    model_ref = bentoml.models.BentoModel(CONFIG.model_tag)  # `bentoml build` packs this model
    prober = bentoml.depends(AdvMoEProbe)

    def __init__(self):
        stored = stored_model(CONFIG.model_tag)
        card = read_card(stored.path)
        channels, size, _ = card.input_shape
        runtime, choice = load_runtime(stored.path, CONFIG)
        self.model = ServedModel(runtime, card.num_experts, CONFIG.max_batch_size)
        self.spec = InputSpec(channels, size, CONFIG.max_batch_size, CONFIG.max_image_pixels)
        self.probe_spec = InputSpec(channels, size, CONFIG.probe_max_batch_size, CONFIG.max_image_pixels)
        self.classes = list(card.classes)
        self.probes_running = 0
        self.info = {  # GET /model_info: the model card plus how this server serves it
            "tag": str(stored.tag), **card.to_dict(), "runtime": runtime.name, "runtime_choice": choice.to_dict(),
            "execution": "sparse" if runtime.name != "torch" else CONFIG.execution,
            "max_batch_size": CONFIG.max_batch_size, "workers": CONFIG.worker_count(), "threads": CONFIG.model_threads(),
            "attack_probe": {"enabled": CONFIG.probe_enabled, "token_required": bool(CONFIG.probe_token),
                             "attacks": list(ATTACKS), "max_eps": CONFIG.probe_max_eps,
                             "max_steps": CONFIG.probe_max_steps, "max_batch_size": CONFIG.probe_max_batch_size,
                             "timeout_s": CONFIG.probe_timeout_s},
        }

    @bentoml.api(input_spec=PredictInput)
    @client_errors("predict")
    async def predict(self, ctx: bentoml.Context, inputs: list | None = None, images: list[Path] = [],
                      tensor: Path = None, top_k: int = 1, return_experts: bool = False) -> dict:
        """Classify images (PNG/JPEG files, resized and converted as the model needs), a JSON array
        [B, C, H, W] in [0, 1] or a .npy file. Per input: the top_k classes with probabilities and,
        with return_experts, the expert chosen at each MoE layer."""
        if not 1 <= top_k <= len(self.classes):
            raise RequestError(400, "bad_top_k", f"top_k={top_k}: must be between 1 and {len(self.classes)}")
        logits, routing = await self.model.predict(self._batch(inputs, images, tensor, self.spec))
        predictions = [{"top_k": top} for top in top_classes(self.classes, logits, top_k)]
        if return_experts:
            for prediction, route in zip(predictions, routing):
                prediction["experts"] = route.tolist()
        # A Response goes out as is: BentoML would otherwise rebuild the output's JSON schema per request.
        return JSONResponse({"predictions": predictions})

    @bentoml.api(input_spec=ProbeInput)
    @client_errors("attack_probe")
    async def attack_probe(self, ctx: bentoml.Context, labels: list[int], inputs: list | None = None,
                           images: list[Path] = [], tensor: Path = None, attack: str = "pgd",
                           eps: float = 8 / 255, steps: int = 10, step_size: float | None = None,
                           return_adversarial: bool = False) -> dict:
        """Attack the served model on the given inputs and labels (FGSM or PGD, L-inf, capped by the
        server) and report, per input, clean and adversarial predictions, whether the prediction
        and the route flipped, and the perturbation's size. Off unless ADVMOE_PROBE_ENABLED=1."""
        probe_report.check_access(CONFIG, ctx.request.headers.get("authorization", ""))
        x = self._batch(inputs, images, tensor, self.probe_spec)
        probe_report.check_caps(CONFIG, len(self.classes), attack, eps, steps, labels, len(x))
        if self.probes_running >= CONFIG.probe_concurrency:
            raise RequestError(429, "probe_busy", f"{self.probes_running} probe(s) already running (the limit is "
                                                  f"{CONFIG.probe_concurrency}); retry later")
        self.probes_running += 1
        try:
            found = await self.prober.to_async.attack(inputs=x, labels=list(labels), attack=attack, eps=eps,
                                                      steps=steps, step_size=step_size)
            adversarial = np.asarray(found["adversarial"], dtype=np.float32)
            logits, routing = await self.model.score(np.concatenate([x, adversarial]))
        finally:
            self.probes_running -= 1
        return JSONResponse(probe_report.report(self.classes, x, adversarial, labels, attack, eps, steps, found,
                                                logits, routing, return_adversarial))

    @routes.get("/model_info")
    def model_info(self) -> dict:
        """What the model is and how it scored (its model card), and how this server runs it."""
        return self.info

    def _batch(self, inputs, images, tensor, spec: InputSpec) -> np.ndarray:
        tensor = single_file(tensor, "tensor")
        given = [name for name, value in (("inputs", inputs), ("images", images or None), ("tensor", tensor))
                 if value is not None]
        if len(given) != 1:
            raise RequestError(400, "no_input" if not given else "ambiguous_input",
                               "send exactly one of: `images` (PNG/JPEG files, multipart), `inputs` (JSON array "
                               f"{spec.shape} in [0, 1]) or `tensor` (a .npy file); got {', '.join(given) or 'none'}")
        if inputs is not None:
            return from_tensor(inputs, spec)
        if tensor is not None:
            return from_npy(tensor, spec)
        return from_images(images, spec)


AdvMoE.add_asgi_middleware(RequestGate, max_bytes=CONFIG.max_body_bytes, routes=("/predict", "/attack_probe"))
