"""A client for the exported model served by Triton Inference Server, over HTTP or gRPC.

    from clients.triton_client import TritonClient
    with TritonClient("localhost:8000", model="advmoe") as client:          # or "grpc://localhost:8001"
        logits, routing = client.infer(x)   # x: float32 [B, C, H, W] in [0, 1]

Tensor names, data types, per-sample shapes and max_batch_size come from the server's model
metadata and config, not from this file; batches larger than max_batch_size are split. The
client waits for the server and the model to be ready up to a deadline, and its errors say
what to fix. It talks to the server over the network only (numpy and tritonclient, no torch,
nothing from serving/, training/ or export/).

    python -m clients.triton_client grpc://127.0.0.1:8001 image.png ...   # or --random 4
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
NAMES = {"http": "HTTP", "grpc": "gRPC"}
NUMPY_TYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
               "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
LOCAL_SERVER_HINT = "`python -m clients.triton_server serve out/triton` starts a local one (docs/triton.md)"


class TritonError(RuntimeError):
    """The server refused or failed a request; the message says which server, model and why."""


class TritonUnavailable(TritonError):
    """The server cannot be reached, or it is up but the model is not ready."""


class TritonInputError(ValueError):
    """The input does not fit the served model (shape, dtype or value range)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str            # Triton's name: FP32, INT64, ...
    shape: tuple[int, ...]   # per sample when the model batches (-1: any size)

    @property
    def dtype(self):
        return NUMPY_TYPES.get(self.datatype)


def parse_url(url: str, protocol: str | None = None) -> tuple[str, str, bool]:
    """'grpc://h:p', 'http://h:p', 'https://h:p' or 'h[:p]' -> (protocol, 'h:p', ssl)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = None, url
    ssl = scheme == "https"
    if scheme == "https":
        scheme = "http"
    if scheme not in (None, "http", "grpc"):
        raise ValueError(f"Triton URL {url!r}: use http://HOST:PORT, https://HOST:PORT, grpc://HOST:PORT or HOST:PORT")
    if protocol not in (None, "http", "grpc"):
        raise ValueError(f"protocol {protocol!r}: choose 'http' or 'grpc'")
    if scheme and protocol and scheme != protocol:
        raise ValueError(f"Triton URL {url!r} says {scheme} but protocol={protocol!r}; drop one of them")
    protocol = scheme or protocol or "http"
    hostport = rest.rstrip("/")
    if not hostport or "/" in hostport:
        raise ValueError(f"Triton URL {url!r}: give HOST:PORT only, without a path")
    _, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit():
        hostport = f"{hostport}:{DEFAULT_PORTS[protocol]}"
    return protocol, hostport, ssl


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)  # gRPC's JSON gives int64 fields as strings


class TritonClient:
    """One model on one Triton server. `wait` is the readiness deadline (seconds) at construction;
    `timeout` bounds each request."""

    def __init__(self, url: str = "localhost:8000", model: str = "advmoe", protocol: str | None = None,
                 version: str = "", timeout: float = 30.0, wait: float = 10.0):
        self.protocol, self.hostport, ssl = parse_url(url, protocol)
        self.url = f"{'https' if ssl else self.protocol}://{self.hostport}"
        self.model, self.version, self.timeout = model, str(version), timeout
        if self.protocol == "http":
            import tritonclient.http as triton

            self._client = triton.InferenceServerClient(self.hostport, ssl=ssl, connection_timeout=timeout,
                                                        network_timeout=timeout)
            self._kw = {}
        else:
            import tritonclient.grpc as triton

            self._client = triton.InferenceServerClient(self.hostport)
            self._kw = {"client_timeout": timeout}
        self._triton = triton
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.max_batch_size = 0
        self.config: dict = {}
        self.wait_ready(wait)

    # -- readiness and metadata ---------------------------------------------------------------
    def wait_ready(self, timeout: float = 10.0) -> "TritonClient":
        """Poll until the server is live and the model ready, then read the model's metadata and
        config; past `timeout` seconds raise TritonUnavailable with the last reason."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            reached, reason = self._probe()
            if reason is None:
                self._read_model()
                return self
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))
        waited = f"after waiting {timeout:g}s" if timeout > 0 else "(no wait)"
        if not reached:
            other = "grpc" if self.protocol == "http" else "http"
            raise TritonUnavailable(
                f"cannot reach a Triton server at {self.url} {waited}: {reason}. Is the server running, and is "
                f"{self.hostport} its {NAMES[self.protocol]} port (not its {NAMES[other]} one)? Triton listens on "
                f"HTTP {DEFAULT_PORTS['http']}, gRPC {DEFAULT_PORTS['grpc']} by default; {LOCAL_SERVER_HINT}")
        raise TritonUnavailable(f"the Triton server at {self.url} is up but model {self.model!r} is not ready "
                                f"{waited}: {reason}{self._models_hint()}")

    def _probe(self) -> tuple[bool, str | None]:
        """(server reached, why the model is not usable yet or None)."""
        try:
            if not self._client.is_server_live(**self._kw):
                return True, "the server is not live"
        except Exception as error:  # refused, timed out, wrong protocol: every kind means "not reached"
            return False, _reason(error)
        try:
            if not self._client.is_server_ready(**self._kw):
                return True, "the server is live but not ready (still loading models?)"
            if not self._client.is_model_ready(self.model, self.version, **self._kw):
                self._client.get_model_metadata(self.model, self.version, **self._kw)  # says "unknown model"
                return True, "the server has the model but it is not ready (still loading?)"
        except Exception as error:
            return True, _reason(error)
        return True, None

    def _models_hint(self) -> str:
        try:
            index = self._client.get_model_repository_index(**({"as_json": True} if self.protocol == "grpc" else {}),
                                                            **self._kw)
        except Exception:  # the repository API may be restricted (pytriton guards it with a token)
            return ""
        index = index.get("models", []) if isinstance(index, dict) else index
        models = ", ".join(f"{m.get('name')} ({m.get('state', 'unknown').lower() or 'unknown'})" for m in index)
        return f". Models on this server: {models or 'none'}"

    def _read_model(self) -> None:
        try:
            if self.protocol == "grpc":
                meta = self._client.get_model_metadata(self.model, self.version, as_json=True, **self._kw)
                config = self._client.get_model_config(self.model, self.version, as_json=True, **self._kw)["config"]
            else:
                meta = self._client.get_model_metadata(self.model, self.version)
                config = self._client.get_model_config(self.model, self.version)
        except Exception as error:
            raise TritonError(f"cannot read model {self.model!r}'s metadata and config from {self.url}: "
                              f"{_reason(error)}") from error
        self.config = config
        self.max_batch_size = int(config.get("max_batch_size", 0))
        skip = 1 if self.max_batch_size > 0 else 0  # metadata shapes start with the batch axis (-1)
        self.inputs = [TensorSpec(t["name"], t["datatype"], _ints(t["shape"])[skip:]) for t in meta["inputs"]]
        self.outputs = [TensorSpec(t["name"], t["datatype"], _ints(t["shape"])[skip:]) for t in meta["outputs"]]
        if len(self.inputs) != 1:
            raise TritonError(f"model {self.model!r} at {self.url} takes {len(self.inputs)} inputs "
                              f"({', '.join(t.name for t in self.inputs)}); this client feeds one image batch")
        if self.inputs[0].dtype is None or not np.issubdtype(self.inputs[0].dtype, np.floating):
            raise TritonError(f"model {self.model!r} at {self.url} takes {self.inputs[0].datatype} input; this client "
                              "sends pixels as floats in [0, 1]")

    # -- inference ----------------------------------------------------------------------------
    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    def check_input(self, x) -> np.ndarray:
        """x as a contiguous array of the model's input type, or TritonInputError saying what to change."""
        x = np.asarray(x)
        spec = self.input
        batched = self.max_batch_size > 0
        expected = ("B",) * batched + tuple("?" if d < 0 else d for d in spec.shape)
        shown = "[" + ", ".join(map(str, expected)) + "]"
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TritonInputError(f"input has dtype {x.dtype}; model {self.model!r} takes {spec.datatype} pixels")
        if batched and x.ndim == len(spec.shape) and _fits(x.shape, spec.shape):
            raise TritonInputError(f"input has shape {list(x.shape)}, one image without a batch axis; model "
                                   f"{self.model!r} takes {shown}: pass x[None]")
        if x.ndim != len(expected) or not _fits(x.shape[batched:], spec.shape):
            raise TritonInputError(f"input has shape {list(x.shape)}; model {self.model!r} at {self.url} takes "
                                   f"{spec.name!r} {shown} ({spec.datatype}, batch first). Resize the images to the "
                                   "model's channels and size")
        if batched and x.shape[0] == 0:
            raise TritonInputError("input is an empty batch; send at least one image")
        if x.size and not (x.min() >= 0 and x.max() <= 1):  # also false for NaN
            raise TritonInputError(f"input values span [{x.min()}, {x.max()}]; the model takes pixels in [0, 1] "
                                   "(normalization is inside it): divide 8-bit images by 255")
        return np.ascontiguousarray(x, dtype=spec.dtype)

    def infer_outputs(self, x) -> dict[str, np.ndarray]:
        """Every output of the model by name, for the batch x (split into max_batch_size pieces)."""
        x = self.check_input(x)
        if self.max_batch_size <= 0:
            return self._infer(x)
        parts = [self._infer(x[i:i + self.max_batch_size]) for i in range(0, len(x), self.max_batch_size)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def infer(self, x) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits [B, classes] float32, routing [B, n_moe_layers] int64 or None for a dense model):
        the first floating output and the first integer output the model declares."""
        out = self.infer_outputs(x)
        floats = [t.name for t in self.outputs if t.dtype is not None and np.issubdtype(t.dtype, np.floating)]
        ints = [t.name for t in self.outputs if t.dtype is not None and np.issubdtype(t.dtype, np.integer)]
        if not floats:
            raise TritonError(f"model {self.model!r} at {self.url} has no floating output to read logits from "
                              f"(outputs: {', '.join(f'{t.name} {t.datatype}' for t in self.outputs)})")
        return out[floats[0]], (out[ints[0]] if ints else None)

    def _infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        triton = self._triton
        request = triton.InferInput(self.input.name, list(x.shape), self.input.datatype)
        request.set_data_from_numpy(x)
        wanted = [triton.InferRequestedOutput(t.name) for t in self.outputs]
        try:
            result = self._client.infer(self.model, [request], model_version=self.version, outputs=wanted, **self._kw)
        except triton.InferenceServerException as error:
            raise TritonError(f"Triton at {self.url} failed model {self.model!r} on a batch of shape {list(x.shape)}: "
                              f"{_reason(error)}") from error
        except Exception as error:
            raise TritonUnavailable(f"lost the Triton server at {self.url} during a request: {_reason(error)}. "
                                    "Is it still running?") from error
        return {t.name: result.as_numpy(t.name) for t in self.outputs}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "TritonClient":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def _fits(shape, spec) -> bool:
    return len(shape) == len(spec) and all(d < 0 or s == d for s, d in zip(shape, spec))


def _reason(error: Exception) -> str:
    text = error.message() if callable(getattr(error, "message", None)) else str(error)
    text = " ".join((text or type(error).__name__).split())
    return f"{type(error).__name__}: {text[:300]}"


def _load_images(paths: list[str], shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    channels, height, width = shape
    images = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB").resize((width, height))
            pixels = np.asarray(image, dtype=np.float32) / 255.0
        images.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
    return np.stack(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.triton_client",
                                     description="Classify images with the model served by Triton.")
    parser.add_argument("url", help="grpc://HOST:8001, http://HOST:8000 or HOST:PORT (HTTP)")
    parser.add_argument("images", nargs="*", help="image files (resized to the model's input)")
    parser.add_argument("--model", default="advmoe")
    parser.add_argument("--random", type=int, default=0, metavar="N", help="send N random images instead")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the model to be ready")
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.random):
        parser.error("give image files or --random N")
    try:
        with TritonClient(args.url, args.model, wait=args.wait) as client:
            shape = client.input.shape
            x = (np.random.default_rng(0).random((args.random, *shape), dtype=np.float32) if args.random
                 else _load_images(args.images, shape))
            logits, routing = client.infer(x)
    except (TritonError, TritonInputError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    for i, label in enumerate(args.images or [f"random {i}" for i in range(args.random)]):
        line = f"{label}: class {probabilities[i].argmax()} (p={probabilities[i].max():.3f})"
        if routing is not None:
            line += f", experts {routing[i].tolist()}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
