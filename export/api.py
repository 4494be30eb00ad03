"""`advmoe export`: a checkpoint to ONNX, torch.export, TorchScript, an AOTInductor package, a
Triton repository and the BentoML model store, each checked against eager sparse execution
before anything is kept."""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime
import torch

import advmoe
from advmoe.card import CARD
from advmoe.checkpoint import CONFIG, METRICS, WEIGHTS, read_card
from advmoe.io import atomic_directory
from advmoe.runtime_choice import KEY, MAX_BATCH_SIZE, RECORD
from advmoe.runtimes import EXECUTIONS
from advmoe.settings import ConfigError, setting, validate_choices

from . import bento, triton
from .aoti import aoti_runner, export_aoti
from .graph import OPSET, eager_runner, export_onnx, export_program, onnx_runner, program_runner
from .parity import ATOL, check_parity, parity_batches
from .timing import time_runtimes as time_runtimes_of
from .torchscript import DEPRECATION, export_torchscript, torchscript_runner

FORMATS = ("onnx", "pt2", "torchscript", "aoti", "triton", "bento")
# `all` leaves out aoti: its C++ compile (25 s for checkpoints/fmnist-tiny on 2 cores, against
# 13 s for all the other formats) would triple the export that `make run` does.
ALIASES = {"all": ("onnx", "pt2", "torchscript", "triton", "bento")}
CHOICES = FORMATS + tuple(ALIASES)  # what `advmoe export --format` accepts
FORMAT_HELP = ("what to write (all: every format but aoti; torchscript writes model.pt for LibTorch and Triton, aoti "
               "an AOTInductor package; see docs/export.md)")


@dataclass
class ExportSettings:
    """What `advmoe export` writes, and how; `export_checkpoint` takes the same names."""
    formats: tuple[str, ...] = setting(("all",), FORMAT_HELP, choices=CHOICES)
    name: str = setting("advmoe", "Triton and BentoML model name")
    opset: int = setting(OPSET, "ONNX opset (the dynamo exporter needs 18 or newer)")
    max_batch_size: int = setting(MAX_BATCH_SIZE, "Triton's max_batch_size, and the largest batch the runtimes are "
                                                  "timed at (the service's batcher cap)")
    execution: str = setting("sparse", "the execution exported (masked: a baseline for `advmoe bench serve`)",
                             choices=EXECUTIONS)
    time_runtimes: bool = setting(True, "time each runtime the service can run on the exported model and record "
                                        "the fastest, which the service then runs by default (docs/export.md)")
    timing_rounds: int = setting(7, "interleaved rounds of that timing (medians taken)")

    def __post_init__(self):
        validate_choices(self)
        if self.timing_rounds < 1:
            raise ConfigError(f"--timing-rounds {self.timing_rounds}: must be at least 1 (--no-time-runtimes skips "
                              f"the timing)")


@dataclass
class ExportResult:
    out: Path
    files: list[Path]
    parity: dict = field(default_factory=dict)
    bento_tag: str | None = None


def resolve_formats(formats: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The formats to write, aliases expanded, in FORMATS' order (the names already checked)."""
    chosen = [name for f in formats for name in ALIASES.get(f, (f,))]
    return tuple(f for f in FORMATS if f in chosen)


def export_checkpoint(checkpoint: str | Path, out: str | Path, formats=ExportSettings.formats, force: bool = False,
                      name: str = ExportSettings.name, opset: int = ExportSettings.opset,
                      max_batch_size: int = ExportSettings.max_batch_size, atol: float = ATOL,
                      execution: str = ExportSettings.execution, time_runtimes: bool = ExportSettings.time_runtimes,
                      timing_rounds: int = ExportSettings.timing_rounds, log=print) -> ExportResult:
    """Export `checkpoint` into the directory `out` (refused if it exists, unless force).

    out/model.onnx, out/model.pt2, out/model.pt (TorchScript), out/model.aoti.pt2 (AOTInductor),
    out/triton/<name>/... and out/triton/<name>_libtorch/..., out/config.json, out/metrics.json,
    out/card.json and out/export.json (parity report and, with time_runtimes, each servable runtime's
    timing and the fastest); `bento` adds `<name>:<version>` to the BentoML store.
    The directory appears only once every parity check has passed. `execution="masked"` exports
    the reference code's way of running (every expert, then select): a baseline for benchmarks,
    in every format but TorchScript.
    """
    # a wrong choice: one line, before any work
    ExportSettings(formats=tuple(formats), name=name, opset=opset, max_batch_size=max_batch_size, execution=execution,
                   time_runtimes=time_runtimes, timing_rounds=timing_rounds)
    formats = resolve_formats(formats)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if execution == "masked" and "torchscript" in formats:
        raise ValueError("--format torchscript writes sparse execution only; --execution masked (a baseline) "
                         "exports to onnx, pt2, aoti, triton (its ONNX model) and bento")
    # The TorchScript model of a Triton repository holds sparse execution only.
    torchscript = "torchscript" in formats or ("triton" in formats and execution == "sparse")
    if "triton" in formats:
        for runtime in ("onnxruntime", "torchscript") if torchscript else ("onnxruntime",):
            triton.model_name(name, runtime)  # a clear error before any work
    if "bento" in formats and not bento.NAME.match(name):
        raise ValueError(f"--name {name!r} is not a valid BentoML model name (lowercase, digits, . _ -)")
    model = advmoe.load_checkpoint(checkpoint)  # first: its errors say best what is wrong with a checkpoint
    card = read_card(checkpoint)
    # Sparse execution is what gets exported; NCHW keeps the graph free of layout copies
    # (onnxruntime picks its own layout).
    advmoe.set_execution(model, execution, channels_last=False)
    reference = eager_runner(model)
    batches = parity_batches(model)
    report = {"execution": execution, "opset": opset, "atol": atol, "torch": torch.__version__, "onnx": onnx.__version__,
              "onnxruntime": onnxruntime.__version__, "advmoe": advmoe.__version__, "parity": {}}
    files, bento_tag = [], None

    def export_and_check(kind: str, file: Path, export, runner) -> None:
        start = time.perf_counter()
        export(model, file)
        report["parity"][kind] = check_parity(kind, reference, runner(file), batches, atol)
        log(f"{file.name}: exported and checked in {time.perf_counter() - start:.1f}s, "
            f"max |logits - eager| {max(report['parity'][kind].values()):.1e}")
        files.append(out / file.name)

    with atomic_directory(out, may_replace=lambda p: force) as tmp:
        if {"onnx", "triton", "bento"} & set(formats):
            export_and_check("onnxruntime", tmp / "model.onnx", lambda m, f: export_onnx(m, f, opset), onnx_runner)
        if {"pt2", "bento"} & set(formats):
            export_and_check("torch.export", tmp / "model.pt2", export_program, program_runner)
        if torchscript:
            print(DEPRECATION, file=sys.stderr)  # instead of torch's warning on every TorchScript call
            export_and_check("torchscript", tmp / "model.pt", export_torchscript, torchscript_runner)
        if "aoti" in formats:
            export_and_check("aotinductor", tmp / "model.aoti.pt2", export_aoti, aoti_runner)
        if "triton" in formats:
            exported = {"onnxruntime": tmp / "model.onnx"} | ({"torchscript": tmp / "model.pt"} if torchscript else {})
            for folder in triton.write_repository(tmp / "triton", name, exported, model, max_batch_size,
                                                  list(card.classes)):
                files.append(out / "triton" / folder.name)
        for source in (CONFIG, METRICS, WEIGHTS):  # the weights: for the service's eager torch runtime
            if (Path(checkpoint) / source).is_file():
                shutil.copyfile(Path(checkpoint) / source, tmp / source)
        card.write(tmp)  # also for a checkpoint older than cards
        if time_runtimes:
            start = time.perf_counter()
            timing = time_runtimes_of(tmp, card, execution, max_batch_size, timing_rounds)
            report[KEY] = timing.to_dict()
            log(f"runtimes timed in {time.perf_counter() - start:.1f}s (ms per batch of {timing.batches}, "
                f"{timing.threads} thread): " + "; ".join(f"{r} {', '.join(f'{t:.2f}' for t in ms)}"
                                                          for r, ms in timing.ms.items()) + f"; fastest: {timing.fastest}")
        (tmp / RECORD).write_text(json.dumps(report, indent=2) + "\n")
        if "bento" in formats:
            # Last, inside the block: if the store refuses, the output directory is not created.
            stored = [tmp / f for f in ("model.onnx", "model.pt2", WEIGHTS, CONFIG, METRICS, CARD, RECORD)
                      if (tmp / f).is_file()]
            bento_tag = bento.save_model(name, stored, card, execution, report.get(KEY, {}).get("fastest"))
            log(f"BentoML model {bento_tag}")
    return ExportResult(out=out, files=files, parity=report["parity"], bento_tag=bento_tag)
