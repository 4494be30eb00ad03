"""The served model in one of three runtimes, all reading the BentoML model `advmoe export` made:
onnxruntime runs the exported graph (the sparse dispatch is in it), `torch` runs the eager model
from its safetensors weights (sparse or masked execution), `pt2` runs the torch.export program.
Each maps a float32 batch [B, C, H, W] in [0, 1] to (logits [B, classes], routing [B, layers])."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from advmoe.runtime_choice import RuntimeChoice, choose_runtime
from advmoe.runtimes import RUNTIMES, onnx_session

from .config import ServingConfig


class Runtime:
    name: str

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        self.session = onnx_session(path, threads, gpu=True)
        self.providers = self.session.get_providers()
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x):
        outputs = self.session.run(None, {self.input: x})
        routing = outputs[1] if len(outputs) > 1 else np.zeros((len(x), 0), np.int64)
        return outputs[0], routing


class TorchRuntime(Runtime):
    """The eager model: `sparse` runs only the chosen experts, `masked` computes every expert
    and selects, as the paper's reference code does (the baseline of `advmoe bench serve`)."""

    def __init__(self, folder: Path, execution: str, threads: int, program: bool = False, device: str = "cpu",
                 max_batch_size: int = 64):
        import torch

        import advmoe

        torch.set_num_threads(threads)
        self.torch, self.device = torch, torch.device(device)
        self.name = "pt2" if program else "torch"
        self.module = self.graphed = None
        if program:
            self.module = torch.export.load(str(folder / RUNTIMES["pt2"].file)).module()
            return
        model = advmoe.load_checkpoint(folder, map_location=self.device).eval()
        if self.device.type == "cuda":  # the batcher's batches padded to a few buckets, each a CUDA graph
            from advmoe.graphs import BATCH_BUCKETS, GraphedModel

            buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch_size) + (max_batch_size,)
            self.graphed = GraphedModel(model, batch_buckets=buckets)
        else:
            advmoe.set_execution(model, execution, channels_last=execution == "sparse")
        self.model = model

    def __call__(self, x):
        with self.torch.inference_mode():
            x = self.torch.from_numpy(x)
            if self.module is not None:
                out = self.module(x)
                logits, routing = out if isinstance(out, tuple) else (out, None)
            elif self.graphed is not None:
                logits, routing = self.graphed(x.to(self.device, non_blocking=True))
                logits, routing = logits.cpu(), routing.cpu()
            else:
                logits, routing = self.model.forward_with_routing(x)
        routing = routing.numpy() if routing is not None else np.zeros((len(x), 0), np.int64)
        return logits.float().numpy(), routing


def load_runtime(folder: str | Path, config: ServingConfig) -> tuple[Runtime, RuntimeChoice]:
    """The runtime that serves the export in `folder` (the user's, else the one the export measured
    fastest, else onnxruntime) and why it was chosen."""
    folder = Path(folder)
    choice = choose_runtime(config.runtime, folder)
    needed = folder / RUNTIMES[choice.runtime].file
    if not needed.is_file():
        raise FileNotFoundError(f"{folder} has no {needed.name}, which the {choice.runtime} runtime needs; "
                                f"re-export the checkpoint with `advmoe export CKPT --out DIR --format all`")
    threads = config.model_threads()
    if choice.runtime == "onnxruntime":
        return OnnxRuntime(needed, threads), choice
    return TorchRuntime(folder, config.execution, threads, program=choice.runtime == "pt2", device=config.device,
                        max_batch_size=config.max_batch_size), choice
