"""Which runtime serves an exported model when its user names none: the one `advmoe export`
measured fastest on the model itself, recorded in the export's export.json (`runtime_timing`).

Export writes the record (`RuntimeTiming`), the service reads it back (`choose_runtime`); an
export made without timings is served by onnxruntime, and the choice says so. Standard library
only: the service's API worker reads it without torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .runtimes import RUNTIMES

SERVED = ("onnxruntime", "torch", "pt2")  # the runtimes the service runs
AUTO = "auto"  # the service's runtime setting when the user names none
FALLBACK = "onnxruntime"  # for an export that recorded no timings
MAX_BATCH_SIZE = 64  # the service's batcher cap by default, and the largest batch export times
TYPICAL_BATCHES = (1, 8)  # a lone request, and a few merged by the batcher; export adds the cap
RECORD, KEY = "export.json", "runtime_timing"
RULE = ("the lowest geometric mean over the batches of its median ms per batch: each batch counts alike, "
        "so 10% gained at batch 1 weighs as much as 10% at the largest batch")


def fastest_runtime(ms: dict[str, list[float]]) -> str:
    """The runtime that RULE picks from {runtime: median ms per batch, the same batches for all}."""
    if not ms:
        raise ValueError("no runtime was timed")
    return min(ms, key=lambda runtime: sum(math.log(t) for t in ms[runtime]))


@dataclass(frozen=True)
class RuntimeTiming:
    """What export measured: median ms per batch of each runtime, and the fastest by RULE."""
    batches: list[int]
    ms: dict[str, list[float]]  # runtime -> median ms per call, one per batch
    rounds: int  # interleaved rounds the medians are over
    threads: int  # compute threads of each runtime, as the service's default worker has
    inputs: str  # what the model ran on
    fastest: str = ""
    rule: str = RULE

    def __post_init__(self):
        if not self.fastest:
            object.__setattr__(self, "fastest", fastest_runtime(self.ms))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RuntimeTiming":
        return cls(**data)


def read_timing(folder: str | Path) -> RuntimeTiming | None:
    """The timing recorded in folder/export.json; None for an export without one."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text()).get(KEY)
    return RuntimeTiming.from_dict(recorded) if recorded else None


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime that serves, and why: `by` is "user" (a setting named it), "export_timing" (the
    export measured it fastest) or "fallback" (the export recorded no timings)."""
    runtime: str
    by: str
    reason: str
    timing: RuntimeTiming | None = None

    def to_dict(self) -> dict:
        return {"by": self.by, "reason": self.reason, "timing": self.timing.to_dict() if self.timing else None}


def choose_runtime(requested: str, folder: str | Path) -> RuntimeChoice:
    """The runtime to serve the export in `folder` with: `requested` unless it is AUTO, else the
    export's recorded fastest, else FALLBACK."""
    if requested != AUTO:
        return RuntimeChoice(requested, "user", f"{requested} was asked for (ADVMOE_RUNTIME / advmoe serve --runtime)")
    timing = read_timing(folder)
    if timing is None:
        return RuntimeChoice(FALLBACK, "fallback", f"the export recorded no runtime timings (made before export timed "
                                                   f"them, or with --no-time-runtimes): {FALLBACK} by default")
    if timing.fastest not in SERVED or not (Path(folder) / RUNTIMES[timing.fastest].file).is_file():
        raise ValueError(f"the export's fastest runtime {timing.fastest!r} cannot be served from {folder}; "
                         f"set ADVMOE_RUNTIME to one of: {', '.join(SERVED)}")
    times = "; ".join(f"{runtime} " + ", ".join(f"{ms:.2f}" for ms in times) for runtime, times in timing.ms.items())
    return RuntimeChoice(timing.fastest, "export_timing",
                         f"fastest when export timed the runtimes (ms per batch of {timing.batches}: {times}; "
                         f"{timing.threads} thread(s), median of {timing.rounds} rounds)", timing)
