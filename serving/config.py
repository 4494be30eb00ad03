"""Server settings, read from ADVMOE_* environment variables (BentoML's own settings, such as
the port and the number of workers, stay on `bentoml serve`). A bad value stops the server at
start with a message that names the variable, instead of a surprise at the first request."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

RUNTIMES = ("onnxruntime", "torch", "pt2")
EXECUTIONS = ("sparse", "masked")
ATTACKS = ("fgsm", "pgd")
PROBE_NICENESS = 10  # the probe worker's: under /predict load it gets about a tenth of a core


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServingConfig:
    model_tag: str = "advmoe:latest"  # the BentoML model `advmoe export` wrote
    runtime: str = "onnxruntime"  # onnxruntime (the exported graph) | torch (eager) | pt2 (torch.export)
    execution: str = "sparse"  # torch runtime only: sparse dispatch or masked (every expert, then select)
    # API worker processes, each with the model and its batcher; 0 = one per core. On 2 cores, 2
    # workers of 1 thread served more images per second and per CPU second than 1 of 2 threads
    # (`advmoe bench serve --workers N --threads M`, docs/clients.md).
    workers: int = 0
    threads: int = 0  # compute threads of each worker's model; 0 = the cores shared out over the workers
    max_batch_size: int = 64  # inputs per request, and the adaptive batcher's cap
    max_body_bytes: int = 8 * 2**20  # a larger request body gets 413
    max_image_pixels: int = 4096 * 4096  # checked before decoding: no decompression bombs
    probe_enabled: bool = False  # /attack_probe is expensive: off unless enabled
    probe_token: str = ""  # when set, /attack_probe needs `Authorization: Bearer <token>`
    probe_max_eps: float = 0.3  # L-inf, pixel units (8/255 is 0.031)
    probe_max_steps: int = 20
    probe_max_batch_size: int = 8
    probe_timeout_s: float = 10.0  # an attack stops at this deadline and says so
    probe_concurrency: int = 1  # probes running at once; more get 429
    probe_threads: int = 1  # the probe worker's threads: it never takes every core from /predict

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"ADVMOE_RUNTIME={self.runtime!r}: choose one of {', '.join(RUNTIMES)}")
        if self.execution not in EXECUTIONS:
            raise ConfigError(f"ADVMOE_EXECUTION={self.execution!r}: choose one of {', '.join(EXECUTIONS)}")
        if self.execution == "masked" and self.runtime != "torch":
            raise ConfigError("ADVMOE_EXECUTION=masked needs ADVMOE_RUNTIME=torch (an exported graph runs "
                              "the way it was exported: export a masked graph with `advmoe export --execution masked`)")
        for name in ("max_batch_size", "max_body_bytes", "max_image_pixels", "probe_max_steps",
                     "probe_max_batch_size", "probe_concurrency", "probe_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: must be at least 1")
        if self.threads < 0:
            raise ConfigError(f"ADVMOE_THREADS={self.threads}: must be 0 (the cores shared out) or more")
        if self.workers < 0:
            raise ConfigError(f"ADVMOE_WORKERS={self.workers}: must be 0 (one per core) or more")
        if not 0 < self.probe_max_eps <= 1:
            raise ConfigError(f"ADVMOE_PROBE_MAX_EPS={self.probe_max_eps}: must be in (0, 1], pixel units "
                              f"(e.g. 0.0314 for 8/255)")
        if self.probe_timeout_s <= 0:
            raise ConfigError(f"ADVMOE_PROBE_TIMEOUT_S={self.probe_timeout_s}: must be positive")

    def worker_count(self, cpus: int | None = None) -> int:
        return self.workers or cpus or os.cpu_count() or 1

    def model_threads(self, cpus: int | None = None) -> int:
        """Compute threads per worker: ADVMOE_THREADS, or the cores shared out over the workers."""
        cpus = cpus or os.cpu_count() or 1
        return self.threads or max(1, cpus // self.worker_count(cpus))

    @classmethod
    def from_env(cls, environ=None) -> "ServingConfig":
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _parse(raw, f.type)
            except ValueError:
                raise ConfigError(f"{env_name(f.name)}={raw!r}: expected {f.type}") from None
        return cls(**values)


def env_name(field: str) -> str:
    return f"ADVMOE_{field.upper()}"


def _parse(raw: str, kind: str):
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    return {"int": int, "float": float, "str": str}[kind](raw)
