"""Adaptive batching inside the API worker, with no wait of its own.

Requests' inputs queue up while the model runs; as soon as it is free, everything queued (up to
`max_batch_size` inputs) goes into the next call. A lone request therefore runs at once, also
right after a burst, and under load the batches grow by themselves to what arrived during one
model call. The model runs on one thread of its own (onnxruntime and torch release the GIL), so
the event loop keeps reading and decoding requests meanwhile.

Why not BentoML's batcher (bentoml 1.4.40, `@bentoml.api(batchable=True)`): it holds a request
for the average wait it has seen over its last 50 batches (after a burst, about one batch
duration), `max_latency_ms` only cancels requests (503) and never shortens that wait, and a
batchable API takes a single argument, so `top_k` and one request's bad input could not stay
that request's own.
"""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


class Batcher:
    """`await batcher(x)` runs `fn` on x ([n, ...], n <= max_batch_size) merged with whatever
    else is queued, and returns fn's outputs for x's rows: fn maps an array [N, ...] to a tuple
    of arrays [N, ...]. An exception in fn fails the requests of that call only."""

    def __init__(self, fn: Callable[[np.ndarray], tuple[np.ndarray, ...]], max_batch_size: int,
                 executor: ThreadPoolExecutor):
        self.fn, self.max_batch_size, self.executor = fn, max_batch_size, executor
        self.queue: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self.running = False

    async def __call__(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        if not 1 <= len(x) <= self.max_batch_size:
            raise ValueError(f"{len(x)} inputs: a request brings 1 to {self.max_batch_size}")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.append((x, future))
        if not self.running:
            self.running = True
            loop.create_task(self._drain())
        return await future

    def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        batch, n = [], 0
        while self.queue and n + len(self.queue[0][0]) <= self.max_batch_size:
            x, future = self.queue.popleft()
            if future.cancelled():  # the client went away while queued
                continue
            batch.append((x, future))
            n += len(x)
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.queue:
                batch = self._next_batch()
                if not batch:
                    continue
                x = batch[0][0] if len(batch) == 1 else np.concatenate([x for x, _ in batch])
                try:
                    outputs = await loop.run_in_executor(self.executor, self.fn, x)
                except Exception as e:  # noqa: BLE001 - handed to the requests of this call
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                start = 0
                for part, future in batch:
                    end = start + len(part)
                    if not future.done():
                        future.set_result(tuple(out[start:end] for out in outputs))
                    start = end
        finally:
            self.running = False
