"""The served model inside the API worker: the runtime on a thread of its own, the batcher in
front of it, and the model's metrics (compute time, batch size, expert usage and imbalance)."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .batching import Batcher
from .expert_usage import ExpertUsage
from .metrics import metrics
from .runtimes import Runtime


class ServedModel:
    def __init__(self, runtime: Runtime, num_experts: int, max_batch_size: int):
        self.runtime = runtime
        # One model call at a time: the runtime's own threads use the cores.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="advmoe-model")
        self.batcher = Batcher(self._predict_batch, max_batch_size, self.executor)
        self.expert_usage = ExpertUsage(num_experts)

    async def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, routing) for x, batched with the other requests in flight."""
        return await self.batcher(x)

    async def score(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, routing) for the attack probe's inputs: the same runtime and thread, not
        batched with /predict and not counted as traffic."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._run, x, "attack_probe")

    def _predict_batch(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, routing = self._run(x, "predict")
        self.expert_usage.add(routing)
        return logits, routing

    def _run(self, x: np.ndarray, endpoint: str) -> tuple[np.ndarray, np.ndarray]:
        m = metrics()
        start = time.perf_counter()
        logits, routing = self.runtime(np.ascontiguousarray(x, dtype=np.float32))
        m.compute_seconds.labels(endpoint, self.runtime.name).observe(time.perf_counter() - start)
        m.batch_size.labels(endpoint).observe(len(x))
        return logits, routing.astype(np.int64, copy=False)


def top_classes(classes: list[str], logits: np.ndarray, k: int) -> list[list[dict]]:
    """The k most probable classes of each row of logits, with softmax probabilities."""
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class": classes[c], "index": int(c), "probability": float(p[c])} for c in row]
            for row, p in zip(order, probs)]
