"""Server settings, read from ADVMOE_* environment variables (BentoML's own settings, such as
the port and the number of workers, stay on `bentoml serve`). A bad value stops the server at
start with a message that names the variable, instead of a surprise at the first request."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from advmoe.runtime_choice import AUTO, FALLBACK, MAX_BATCH_SIZE, SERVED
from advmoe.runtimes import EXECUTIONS, runtime_choices
from advmoe.settings import ConfigError, setting, validate_choices

RUNTIMES = runtime_choices(SERVED)  # the runtimes the service runs
RUNTIME_CHOICES = {AUTO: f"the runtime `advmoe export` measured fastest on the model ({FALLBACK} for an export "
                         f"without timings)", **RUNTIMES}
ATTACKS = ("fgsm", "pgd")
PROBE_NICENESS = 10  # the probe worker's: under /predict load it gets about a tenth of a core


@dataclass(frozen=True)
class ServingConfig:
    model_tag: str = setting("advmoe:latest", "the BentoML model `advmoe export` wrote")
    runtime: str = setting(AUTO, "what runs the model", choices=RUNTIME_CHOICES)
    execution: str = setting("sparse", "the torch runtime's execution (an exported graph runs the way it was "
                                       "exported)", choices=EXECUTIONS)
    device: str = setting("cpu", "where the torch runtime runs: cpu, or cuda / cuda:N, where it runs static execution "
                                 "replayed from CUDA graphs, one per batch bucket (advmoe/graphs.py)")
    # On 2 cores, 2 workers of 1 thread served more images per second and per CPU second than 1 of 2
    # threads (`advmoe bench serve --workers N --threads M`, docs/clients.md).
    workers: int = setting(0, "API worker processes, each with the model and its batcher; 0: one per core")
    threads: int = setting(0, "compute threads of each worker's model; 0: the cores shared out over the workers")
    max_batch_size: int = setting(MAX_BATCH_SIZE, "inputs per request, and the adaptive batcher's cap")
    max_body_bytes: int = setting(8 * 2**20, "largest request body; a larger one gets 413")
    max_image_pixels: int = setting(4096 * 4096, "largest image, checked before decoding (no decompression bombs)")
    probe_enabled: bool = setting(False, "serve /attack_probe (expensive, so off unless enabled)")
    probe_token: str = setting("", "when set, /attack_probe needs `Authorization: Bearer <token>`")
    probe_max_eps: float = setting(0.3, "largest L-inf budget of a probe, in pixel units (8/255 is 0.031)")
    probe_max_steps: int = setting(20, "most attack steps of a probe")
    probe_max_batch_size: int = setting(8, "most inputs of a probe")
    probe_timeout_s: float = setting(10.0, "a probe's deadline in seconds: the attack stops there and says so")
    probe_concurrency: int = setting(1, "probes running at once; more get 429")
    probe_threads: int = setting(1, "the probe worker's threads: it never takes every core from /predict")

    def __post_init__(self):
        validate_choices(self, label=env_name)
        if self.execution == "masked" and self.runtime != "torch":
            raise ConfigError("ADVMOE_EXECUTION=masked needs ADVMOE_RUNTIME=torch (an exported graph runs "
                              "the way it was exported: export a masked graph with `advmoe export --execution masked`)")
        for name in ("max_batch_size", "max_body_bytes", "max_image_pixels", "probe_max_steps",
                     "probe_max_batch_size", "probe_concurrency", "probe_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{env_name(name)}={getattr(self, name)}: must be at least 1")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"ADVMOE_DEVICE={self.device}: give cpu, cuda or cuda:N")
        if self.device != "cpu" and (self.runtime != "torch" or self.execution != "sparse"):
            raise ConfigError(f"ADVMOE_DEVICE={self.device} runs the torch runtime's CUDA graphs: set ADVMOE_RUNTIME=torch "
                              "(ADVMOE_EXECUTION sparse, the default); onnxruntime takes the GPU through its own provider")
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


def environment(**values) -> dict[str, str]:
    """The ADVMOE_* variables that set these fields: what `advmoe serve` hands to the server."""
    return {env_name(name): ("1" if value else "0") if isinstance(value, bool) else str(value)
            for name, value in values.items()}


def _parse(raw: str, kind: str):
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    return {"int": int, "float": float, "str": str}[kind](raw)
