"""The service's Prometheus metrics (served on BentoML's /metrics beside its own request metrics).

BentoML sets PROMETHEUS_MULTIPROC_DIR in each worker after importing the service module, so the
metrics are created on first use, inside the worker, never at import. Every worker (the API, the
model, the probe) writes to the same directory and /metrics shows their sum.
"""
from __future__ import annotations

import functools

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.compute_seconds = Histogram(
            "advmoe_model_compute_seconds", "Time the model takes on one batch (no queueing, no HTTP)",
            ["endpoint", "runtime"], buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram(
            "advmoe_batch_size", "Inputs per model call, after adaptive batching", ["endpoint"], buckets=BATCH_BUCKETS)
        self.expert_samples = Counter(
            "advmoe_expert_routed_samples", "Samples routed to each expert of each MoE layer",
            ["layer", "expert"])
        self.imbalance = Gauge(
            "advmoe_routing_imbalance_ratio",
            "Share of the busiest expert times the number of experts over the last routed samples "
            "(1 = balanced, num_experts = every sample to one expert)", ["layer"], multiprocess_mode="mostrecent")
        self.probe_requests = Counter("advmoe_probe_requests", "Attack probes run", ["attack"])
        self.probe_samples = Counter("advmoe_probe_samples", "Inputs attacked by probes", ["attack"])
        self.probe_prediction_flips = Counter(
            "advmoe_probe_prediction_flips", "Probed inputs whose served prediction the attack changed", ["attack"])
        self.probe_route_flips = Counter(
            "advmoe_probe_route_flips", "Probed inputs whose route (at any MoE layer) the attack changed", ["attack"])
        self.rejected = Counter("advmoe_rejected_requests", "Requests refused, by endpoint and reason",
                                ["endpoint", "reason"])


@functools.cache
def metrics() -> Metrics:
    return Metrics()
