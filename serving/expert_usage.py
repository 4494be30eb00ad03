"""Expert usage for /metrics: samples routed to each expert of each MoE layer, and how unbalanced
the routing was over the last IMBALANCE_WINDOW samples.

Counting is a few numpy operations per batch on the model thread. Prometheus is updated by a
thread of its own at most every `interval` seconds: a multiprocess counter update is a locked
write to a memory-mapped file, and one per layer and expert (plus a gauge per layer) took about
0.3 ms per batch, a tenth of a single-image request's server CPU, which the dense twin does not
pay. Counts reach /metrics within `interval` seconds of the batch; Prometheus scrapes every 15 s
or so.
"""
from __future__ import annotations

import atexit
import threading
import time
from collections import deque

import numpy as np

from .metrics import metrics

IMBALANCE_WINDOW = 1024  # routed samples the imbalance gauge looks back over
FLUSH_SECONDS = 0.5


class ExpertUsage:
    def __init__(self, num_experts: int, window: int = IMBALANCE_WINDOW, interval: float = FLUSH_SECONDS):
        self.num_experts, self.window, self.interval = max(num_experts, 1), window, interval
        self.lock = threading.Lock()
        self.pending: np.ndarray | None = None  # [layers, experts] counts not yet in Prometheus
        self.recent: deque[tuple[np.ndarray, int]] = deque()  # (counts, samples) of the last batches
        self.recent_counts: np.ndarray | None = None  # their sum
        self.recent_samples = 0
        self.changed = threading.Event()
        self.flusher: threading.Thread | None = None

    def add(self, routing: np.ndarray) -> None:
        """Count one batch's routing [samples, layers] (the expert chosen per sample and layer)."""
        samples, layers = routing.shape
        if layers == 0 or samples == 0:
            return
        experts = max(self.num_experts, int(routing.max()) + 1)
        counts = np.bincount((routing + np.arange(layers) * experts).ravel(),
                             minlength=layers * experts).reshape(layers, experts)
        with self.lock:
            if experts > self.num_experts:  # a route past the card's experts: widen what is kept
                self.num_experts = experts
                self.pending = _widen(self.pending, experts)
                self.recent_counts = _widen(self.recent_counts, experts)
                self.recent = deque((_widen(c, experts), n) for c, n in self.recent)
            self.pending = counts if self.pending is None else self.pending + counts
            self.recent.append((counts, samples))
            self.recent_counts = counts.copy() if self.recent_counts is None else self.recent_counts + counts
            self.recent_samples += samples
            while self.recent_samples - self.recent[0][1] >= self.window:
                dropped, n = self.recent.popleft()
                self.recent_counts -= dropped
                self.recent_samples -= n
        self.changed.set()
        if self.flusher is None:  # started in the worker that serves, after BentoML forked it
            self.flusher = threading.Thread(target=self._flush_every_interval, name="advmoe-expert-usage", daemon=True)
            self.flusher.start()
            atexit.register(self.flush)  # what the last interval counted, when the worker stops

    def imbalance(self) -> np.ndarray:
        """Per layer: the busiest expert's share of the recent samples times the number of experts
        (1 = balanced, num_experts = every sample to one expert)."""
        with self.lock:
            if self.recent_counts is None:
                return np.zeros(0)
            return self.recent_counts.max(1) / self.recent_samples * self.num_experts

    def flush(self) -> None:
        """Send the counts since the last flush, and the imbalance now, to Prometheus."""
        with self.lock:
            pending, self.pending = self.pending, None
        if pending is None:
            return
        m = metrics()
        for layer, expert in zip(*np.nonzero(pending)):
            m.expert_samples.labels(str(layer), str(expert)).inc(int(pending[layer, expert]))
        for layer, ratio in enumerate(self.imbalance()):
            m.imbalance.labels(str(layer)).set(float(ratio))

    def _flush_every_interval(self) -> None:
        while True:
            self.changed.wait()
            time.sleep(self.interval)  # the batches of the next interval go in the same update
            self.changed.clear()
            self.flush()


def _widen(counts: np.ndarray | None, experts: int) -> np.ndarray | None:
    return None if counts is None else np.pad(counts, ((0, 0), (0, experts - counts.shape[1])))
