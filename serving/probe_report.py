"""/attack_probe's checks and answer, in the API worker: who may probe, within which caps, and
what the probe found, judged on the served runtime (the gradients are computed by the probe
worker, serving/probe.py)."""
from __future__ import annotations

import secrets

import numpy as np

from .config import ATTACKS, ServingConfig
from .inputs import RequestError
from .metrics import metrics


def check_access(config: ServingConfig, authorization: str) -> None:
    if not config.probe_enabled:
        raise RequestError(404, "probe_disabled", "/attack_probe is disabled on this server "
                                                  "(start it with ADVMOE_PROBE_ENABLED=1)")
    if config.probe_token:
        if not authorization:
            raise RequestError(401, "probe_unauthorized", "/attack_probe needs `Authorization: Bearer <token>`")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), config.probe_token):
            raise RequestError(403, "probe_forbidden", "the probe token is wrong")


def check_caps(config: ServingConfig, num_classes: int, attack: str, eps: float, steps: int, labels, n: int) -> None:
    if attack not in ATTACKS:
        raise RequestError(400, "bad_attack", f"attack={attack!r}: choose one of {', '.join(ATTACKS)}")
    if not 0 < eps <= config.probe_max_eps:
        hint = f" (did you mean {eps:g}/255 = {eps / 255:.4f}?)" if eps > 1 else ""
        raise RequestError(400, "bad_eps", f"eps={eps:g}: must be in (0, {config.probe_max_eps:.4g}] "
                                           f"(L-inf, pixels in [0, 1]){hint}")
    if not 1 <= steps <= config.probe_max_steps:
        raise RequestError(400, "bad_steps", f"steps={steps}: must be between 1 and {config.probe_max_steps}")
    if labels is None:
        raise RequestError(400, "bad_labels", "labels are missing: give one class index per input")
    if len(labels) != n:
        raise RequestError(400, "bad_labels", f"{len(labels)} labels for {n} inputs: give one label per input")
    if any(not 0 <= label < num_classes for label in labels):
        raise RequestError(400, "bad_labels", f"labels must be class indices in [0, {num_classes})")


def report(classes: list[str], x: np.ndarray, adversarial: np.ndarray, labels: list[int], attack: str, eps: float,
           steps: int, attack_result: dict, logits: np.ndarray, routing: np.ndarray, return_adversarial: bool) -> dict:
    """The probe's answer from the served model's logits and routing on [x; adversarial], with
    the probe metrics counted."""
    n = len(x)
    clean, adv = logits[:n].argmax(1), logits[n:].argmax(1)
    route_flips = (routing[:n] != routing[n:]).any(1) if routing.shape[1] else np.zeros(n, bool)
    delta = (adversarial - x).reshape(n, -1)
    results = []
    for i in range(n):
        item = {"label": int(labels[i]), "clean": classes[clean[i]], "clean_index": int(clean[i]),
                "adversarial": classes[adv[i]], "adversarial_index": int(adv[i]),
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
    return {"attack": attack, "eps": eps, "steps_requested": 1 if attack == "fgsm" else steps,
            "steps_run": attack_result["steps_run"], "time_capped": attack_result["time_capped"],
            "clean_accuracy": float((clean == np.asarray(labels)).mean()),
            "adversarial_accuracy": float((adv == np.asarray(labels)).mean()), "results": results}

