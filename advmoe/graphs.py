"""A MoE model in static execution, replayed from CUDA graphs: one graph per (batch bucket,
capacity), captured on first use after a warm-up and replayed after, as the CUDA graph guides
recommend for inference with a few fixed shapes.

A batch is padded up to the smallest batch bucket that holds it (a larger one is cut into pieces
of the largest bucket). With the shared router each expert's capacity is the bucket, so a forward
reads nothing back to the host; with `capacity_buckets` the router runs once outside the graph
and its largest group picks the capacity, the one read of the group sizes per batch. Per-layer
gates route inside the network, so their capacity is always the batch.

`expert_dtype=torch.bfloat16` runs the experts under bf16 autocast and keeps the router in
float32, so that a route does not flip on a rounding of the router's logits.

On a CPU (no CUDA graphs) the same buckets run eagerly: what the GPU replays, checkable here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .dispatch import capacity_for
from .models.base import MoENet, set_execution

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Captured:
    """One graph: its static input and outputs, and what capturing it cost."""

    graph: object | None  # torch.cuda.CUDAGraph, None on a CPU
    x: Tensor
    logits: Tensor
    routing: Tensor
    capture_seconds: float = 0.0
    memory_bytes: int = 0  # the allocator's growth while capturing: the graph's private pool


@dataclass
class GraphedModel:
    model: MoENet
    batch_buckets: tuple[int, ...] = BATCH_BUCKETS
    capacity_buckets: tuple[int, ...] = ()
    expert_dtype: torch.dtype | None = None
    warmup: int = 3
    graphs: dict[tuple[int, int], Captured] = field(default_factory=dict)

    def __post_init__(self):
        if not self.batch_buckets or min(self.batch_buckets) < 1:
            raise ValueError(f"batch buckets must be >= 1, got {self.batch_buckets}")
        self.batch_buckets = tuple(sorted(self.batch_buckets))
        set_execution(self.model.eval(), "static", channels_last=True)
        self.model.expert_dtype = self.expert_dtype
        self.device = next(self.model.parameters()).device
        self.use_graphs = self.device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, routing) of x, as the model's forward_with_routing gives them."""
        largest = self.batch_buckets[-1]
        if x.shape[0] > largest:
            parts = [self(x[i:i + largest]) for i in range(0, x.shape[0], largest)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        batch = x.shape[0]
        bucket = next(b for b in self.batch_buckets if b >= batch)
        padded = x if batch == bucket else torch.cat([x, x.new_zeros((bucket - batch, *x.shape[1:]))])
        capacity = self._capacity(padded, bucket)
        if not self.use_graphs:  # the CPU: the same shapes, run eagerly
            self.model.capacity = capacity
            logits, routing = self.model.forward_with_routing(padded)
            return logits[:batch], routing[:batch]
        captured = self.graphs.get((bucket, capacity)) or self._capture(padded, bucket, capacity)
        captured.x.copy_(padded)
        captured.graph.replay()
        return captured.logits[:batch].clone(), captured.routing[:batch].clone()

    def _capacity(self, x: Tensor, bucket: int) -> int:
        model = self.model
        if not self.capacity_buckets or model.router is None or model.cfg.top_k != 1:
            return bucket
        experts = model.router(model.normalize(x)).argmax(1, keepdim=True)
        return min(capacity_for(experts, model.cfg.num_experts, self.capacity_buckets), bucket)

    def _capture(self, x: Tensor, bucket: int, capacity: int) -> Captured:
        model = self.model
        model.capacity = capacity
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(self.warmup):
                model.forward_with_routing(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph, before, start = torch.cuda.CUDAGraph(), torch.cuda.memory_reserved(self.device), time.perf_counter()
        with torch.cuda.graph(graph):
            logits, routing = model.forward_with_routing(static_x)
        torch.cuda.synchronize()
        captured = Captured(graph, static_x, logits, routing, time.perf_counter() - start,
                            torch.cuda.memory_reserved(self.device) - before)
        self.graphs[(bucket, capacity)] = captured
        return captured

