"""Time each runtime the service can run on the exported model itself, side by side, so the
export can record the fastest (advmoe.runtime_choice) and the service run it by default.

Every runtime reads its file from the export folder and runs as the service runs it: onnxruntime
through the project's one session (spinning off), eager torch in sparse execution
(channels_last), the torch.export program. Timed in interleaved rounds (each round
times every runtime at every batch in turn, so a noisy machine slows them alike); medians.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import advmoe
from advmoe.card import ModelCard
from advmoe.runtime_choice import SERVED, TYPICAL_BATCHES, RuntimeTiming
from advmoe.runtimes import RUNTIMES, onnx_session

# The service's default worker runs its model on one thread (one worker per core, the cores
# shared out: serving/config.py), so that is how the runtimes are compared.
THREADS = 1
IMAGES_PER_SAMPLE = 32  # images each timed sample runs at least (several calls at small batches)


def timed_batches(max_batch_size: int) -> list[int]:
    """Batch 1, the batcher's typical merged batches and its cap."""
    return sorted({b for b in TYPICAL_BATCHES if b <= max_batch_size} | {max_batch_size})


def runners(folder: Path, execution: str, threads: int) -> dict[str, Callable[[np.ndarray], object]]:
    """{runtime: run(x)} for each runtime the service can run whose file is in `folder`. Eager
    torch only for a sparse export: the service's torch runtime runs its own execution setting,
    not a masked export's."""
    found = {}
    for runtime in SERVED:
        path = folder / RUNTIMES[runtime].file
        if not path.is_file() or (runtime == "torch" and execution != "sparse"):
            continue
        if runtime == "onnxruntime":
            session = onnx_session(path, threads)
            name = session.get_inputs()[0].name
            found[runtime] = lambda x, session=session, name=name: session.run(None, {name: x})
        elif runtime == "pt2":
            module = torch.export.load(str(path)).module()
            found[runtime] = lambda x, module=module: module(torch.from_numpy(x))
        else:
            model = advmoe.set_execution(advmoe.load_checkpoint(folder), "sparse").eval()
            found[runtime] = lambda x, model=model: model.forward_with_routing(torch.from_numpy(x))
    return found


def timing_inputs(card: ModelCard, n: int) -> tuple[np.ndarray, str]:
    """n inputs: the model's dataset's test images when they are on this machine (the routing then
    splits as in service), uniform noise otherwise."""
    channels, size, _ = card.input_shape
    try:
        test = advmoe.load_dataset(card.dataset, "test")
        x = torch.stack([test[i][0] for i in range(min(n, len(test)))]).numpy()
        if x.shape[1:] == (channels, size, size) and len(x) == n:
            return np.ascontiguousarray(x, np.float32), f"{card.dataset} test images"
    except (FileNotFoundError, ValueError, TypeError):
        pass
    rng = np.random.default_rng(0)
    return rng.random((n, channels, size, size), dtype=np.float32), "uniform noise"


def ms_per_call(run: Callable, x: np.ndarray, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run(x)
    return (time.perf_counter() - start) / calls * 1e3


def time_runtimes(folder: str | Path, card: ModelCard, execution: str, max_batch_size: int, rounds: int,
                  threads: int = THREADS) -> RuntimeTiming:
    """Median ms per batch of every servable runtime in `folder`, and the fastest by the rule."""
    folder, batches = Path(folder), timed_batches(max_batch_size)
    x, inputs = timing_inputs(card, max(batches))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = runners(folder, execution, threads)  # loaded outside inference mode, as the service loads them
        with torch.inference_mode():
            for runtime in run.values():  # warm-up: first-call allocations, onnxruntime's arena
                for batch in batches:
                    runtime(x[:batch])
            samples = {(name, b): [] for name in run for b in batches}
            for _ in range(rounds):
                for batch in batches:
                    calls = max(1, IMAGES_PER_SAMPLE // batch)
                    for name, runtime in run.items():
                        samples[name, batch].append(ms_per_call(runtime, x[:batch], calls))
    finally:
        torch.set_num_threads(previous)
    ms = {name: [round(statistics.median(samples[name, b]), 4) for b in batches] for name in run}
    return RuntimeTiming(batches=batches, ms=ms, rounds=rounds, threads=threads, inputs=inputs)
