"""A Python client for the advmoe BentoML service (`advmoe serve`), built on BentoML's HTTP clients.

    from clients.client import Client
    with Client("http://127.0.0.1:3000") as client:
        client.model_info.classes                          # what the served model predicts
        for p in client.predict(["shoe.png", "shirt.jpg"], top_k=3):
            print(p.source, p.label, p.probability, p.experts)
        client.predict(x)                                  # x: float [B, C, H, W] in [0, 1] (sent as .npy)

`AsyncClient` has the same methods as coroutines (`async with AsyncClient(url) as client`).

The client first waits for the server's /readyz up to a deadline (`bentoml serve` opens its port
before its workers are up), checks that the server is an advmoe service (a `predict` API and
/model_info), then talks to it over HTTP only: nothing from serving/, training/ or export/, no torch
(/model_info is parsed by advmoe.card, which imports the standard library only).
Batches larger than the server's max_batch_size are split. Errors say what to fix: `Unavailable`
(no server, or not ready in time), `NotAdvMoEServer`, `RequestRejected` (the server's 4xx message,
with file names for images[i]) and `ServerError` (5xx), all `ClientError`s.
"""
from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np

from advmoe.card import ModelCard

DEFAULT_URL = "http://127.0.0.1:3000"
START_HINT = "start one with `advmoe serve --model-tag TAG` (or `make run`), or pass the URL of a running server"
Inputs = np.ndarray | Sequence[str | Path] | str | Path  # image files, or an array [B, C, H, W] in [0, 1]


class ClientError(Exception):
    """Anything that kept a request from giving predictions; the message says what to do."""


class Unavailable(ClientError):
    """No server answers at the URL, it is not ready before the deadline, or it went away."""


class NotAdvMoEServer(ClientError):
    """Something answers at the URL, but not the advmoe service."""


class RequestRejected(ClientError):
    """The server refused the request (4xx) and said why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ServerError(ClientError):
    """The server failed the request (5xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ClassScore:
    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Prediction:
    """One input's answer: its top-k classes, best first, and the expert chosen at each MoE layer
    (None when not asked for; empty for a dense model)."""
    source: str  # the file name, or "inputs[i]" for an array
    top_k: tuple[ClassScore, ...]
    experts: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        return self.top_k[0].label

    @property
    def index(self) -> int:
        return self.top_k[0].index

    @property
    def probability(self) -> float:
        return self.top_k[0].probability

    def to_dict(self) -> dict:
        out = {"source": self.source, "top_k": [asdict(s) for s in self.top_k]}
        if self.experts is not None:
            out["experts"] = list(self.experts)
        return out


@dataclass(frozen=True)
class ModelInfo:
    """GET /model_info: the served model's card (advmoe.card.ModelCard: classes, input shape,
    experts, accuracies...) and how the server serves it; `raw` has everything."""
    card: ModelCard
    max_batch_size: int
    runtime: str | None
    execution: str | None
    tag: str | None
    raw: dict = field(repr=False, compare=False)

    architecture = property(lambda self: self.card.architecture)
    classes = property(lambda self: self.card.classes)
    input_shape = property(lambda self: self.card.input_shape)  # C, H, W
    num_experts = property(lambda self: self.card.num_experts)

    @classmethod
    def from_json(cls, data: Any, url: str) -> "ModelInfo":
        try:
            card = ModelCard.from_dict(data)
        except ValueError as e:
            raise NotAdvMoEServer(f"{url}/model_info does not describe an advmoe model ({e}): is {url} the advmoe "
                                  f"service? {START_HINT}") from None
        return cls(card=card, max_batch_size=int(data.get("max_batch_size") or 64), runtime=data.get("runtime"),
                   execution=data.get("execution"), tag=data.get("tag"), raw=data)


# -- pieces shared by the sync and async clients -------------------------------------------------

def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    scheme = url.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise ValueError(f"URL {url!r}: use http://HOST:PORT (or https://)")
    return url


def _readiness(url: str, response: httpx.Response | None, error: Exception | None) -> tuple[bool, str]:
    """(ready, why not) from one GET /readyz; a server without /readyz is not BentoML."""
    if response is None:
        return False, f"no server answers at {url} ({_reason(error)})"
    if response.status_code == 200:
        return True, ""
    if response.status_code in (404, 405, 501):
        raise NotAdvMoEServer(f"the server at {url} has no /readyz: it is not a BentoML service, so not the "
                              f"advmoe service; {START_HINT}")
    return False, f"a server answers at {url} but is not ready (GET /readyz: HTTP {response.status_code})"


def _not_ready(url: str, why: str, timeout: float) -> Unavailable:
    if why.startswith("no server"):
        return Unavailable(f"{why} within {timeout:g} s; {START_HINT}")
    return Unavailable(f"{why} after {timeout:g} s: its workers may still be starting or crash-looping (see the "
                       f"server's log), or wait longer")


def wait_ready(url: str, timeout_s: float) -> None:
    """Poll GET /readyz until it answers 200, up to timeout_s; else Unavailable (or NotAdvMoEServer)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=min(5.0, max(timeout_s, 0.5))) as http:
        while True:
            response = error = None
            try:
                response = http.get("/readyz")
            except httpx.TransportError as e:
                error = e
            ready, why = _readiness(url, response, error)
            if ready:
                return
            if time.monotonic() >= deadline:
                raise _not_ready(url, why, timeout_s)
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _reason(error: Exception | None) -> str:
    if isinstance(error, httpx.ConnectError):
        return "connection refused" if "refused" in str(error).lower() else f"cannot connect: {error}"
    if isinstance(error, httpx.TimeoutException):
        return "timed out"
    return f"{type(error).__name__}: {error}"


def _connect_error(error: Exception, url: str) -> Exception:
    from bentoml.exceptions import BentoMLException

    if isinstance(error, BentoMLException):  # no /schema.json
        return NotAdvMoEServer(f"the server at {url} is not a BentoML service ({error}): not the advmoe service")
    if isinstance(error, httpx.TransportError):
        return Unavailable(f"lost the server at {url} while connecting ({_reason(error)})")
    return error


def _check_endpoints(client, url: str) -> None:
    if "predict" not in client.endpoints:
        raise NotAdvMoEServer(f"the BentoML service at {url} has no `predict` API (it has: "
                              f"{', '.join(sorted(client.endpoints)) or 'none'}): it is not the advmoe service")


def _server_message(error) -> str:
    text = getattr(error, "message", None) or str(error)
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return text.strip()
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return text.strip()


def _name_images(message: str, names: Sequence[str]) -> str:
    """'images[1] is not an image' -> 'b.png (images[1]) is not an image'."""
    def name(match):
        i = int(match.group(1))
        return f"{names[i]} (images[{i}])" if i < len(names) else match.group(0)

    return re.sub(r"images\[(\d+)\]", name, message)


def _translate(error: Exception, url: str, names: Sequence[str]) -> ClientError:
    from bentoml.exceptions import BentoMLException

    if isinstance(error, BentoMLException):
        status = int(error.error_code)
        message = _name_images(_server_message(error), names)
        if 400 <= status < 500:
            return RequestRejected(status, f"the server refused the request (HTTP {status}): {message}")
        return ServerError(status, f"the server at {url} failed the request (HTTP {status}): {message}")
    if isinstance(error, httpx.TimeoutException):
        return Unavailable(f"the server at {url} did not answer within the client's timeout; it may be overloaded")
    if isinstance(error, httpx.TransportError):
        return Unavailable(f"lost the server at {url} during a request ({_reason(error)}); is it still running?")
    raise error  # not a request failure: a bug to see as it is


def _parse(answer: Any, sources: Sequence[str], url: str) -> list[Prediction]:
    try:
        predictions = answer["predictions"]
        if len(predictions) != len(sources):
            raise ValueError
        return [Prediction(source=source,
                           top_k=tuple(ClassScore(s["class"], int(s["index"]), float(s["probability"]))
                                       for s in p["top_k"]),
                           experts=tuple(int(e) for e in p["experts"]) if "experts" in p else None)
                for source, p in zip(sources, predictions)]
    except (KeyError, TypeError, ValueError):
        raise NotAdvMoEServer(f"{url}/predict answered something other than advmoe predictions: "
                              f"{str(answer)[:200]}") from None


def _chunks(inputs, max_batch: int, workdir: Path) -> list[tuple[dict, list[str]]]:
    """Request arguments and source names for each chunk of at most max_batch inputs."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if isinstance(inputs, np.ndarray) or not all(isinstance(i, (str, Path)) for i in inputs):
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        if x.ndim == 0 or len(x) == 0:
            raise ValueError(f"no inputs: got an array of shape {list(x.shape)}; send [B, C, H, W] with B >= 1")
        out = []
        for start in range(0, len(x), max_batch):
            path = workdir / f"{uuid.uuid4().hex}.npy"
            np.save(path, x[start:start + max_batch])
            out.append(({"tensor": path}, [f"inputs[{i}]" for i in range(start, min(start + max_batch, len(x)))]))
        return out
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no inputs: give at least one image file or an array [B, C, H, W]")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file")
    return [({"images": paths[i:i + max_batch]}, [str(p) for p in paths[i:i + max_batch]])
            for i in range(0, len(paths), max_batch)]


def _cleanup(args: dict) -> None:
    tensor = args.get("tensor")
    if tensor is not None:
        Path(tensor).unlink(missing_ok=True)


class _Base:
    def __init__(self, url: str, ready_timeout_s: float, timeout_s: float):
        self.url = normalize_url(url)
        self.ready_timeout_s, self.timeout_s = ready_timeout_s, timeout_s
        self._workdir = tempfile.TemporaryDirectory(prefix="advmoe-client-")
        self._info: ModelInfo | None = None
        self._bento = None

    @property
    def model_info(self) -> ModelInfo:
        """The served model's description (fetched once, when connecting)."""
        return self._info

    def _info_from(self, response: httpx.Response) -> ModelInfo:
        try:
            data = response.json() if response.status_code == 200 else None
        except ValueError:
            data = None
        return ModelInfo.from_json(data, self.url)


class Client(_Base):
    """Synchronous client: waits for the server (up to ready_timeout_s), then one HTTP call per
    request with timeout_s each."""

    def __init__(self, url: str = DEFAULT_URL, *, ready_timeout_s: float = 30.0, timeout_s: float = 60.0):
        super().__init__(url, ready_timeout_s, timeout_s)
        try:
            wait_ready(self.url, self.ready_timeout_s)
            from bentoml import SyncHTTPClient

            try:
                self._bento = SyncHTTPClient(self.url, server_ready_timeout=0, timeout=self.timeout_s)  # reads /schema.json
            except Exception as e:
                raise _connect_error(e, self.url) from None
            _check_endpoints(self._bento, self.url)
            self._info = self.fetch_model_info()
        except BaseException:
            self.close()
            raise

    def fetch_model_info(self) -> ModelInfo:
        try:
            response = self._bento.request("GET", "/model_info")
        except httpx.TransportError as e:
            raise _translate(e, self.url, []) from None
        return self._info_from(response)

    def predict(self, inputs: Inputs, *, top_k: int = 1, experts: bool = True) -> list[Prediction]:
        """Classify image files (paths; PNG/JPEG, resized and converted by the server) or an array
        [B, C, H, W] in [0, 1]. One Prediction per input, in order."""
        results = []
        for args, sources in _chunks(inputs, self._info.max_batch_size, Path(self._workdir.name)):
            try:
                answer = self._bento.call("predict", **args, top_k=top_k, return_experts=experts)
            except Exception as e:
                raise _translate(e, self.url, sources) from None
            finally:
                _cleanup(args)
            results += _parse(answer, sources, self.url)
        return results

    def close(self) -> None:
        if self._bento is not None:
            self._bento.close()
            self._bento = None
        self._workdir.cleanup()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def task_file_manager():
    """BentoML's async client keeps one list of the files its calls open and closes all of them
    when any call ends: under load, a call still sending its body then reads a closed file
    ("ValueError: seek of closed file", bentoml 1.4.40). This manager keeps each asyncio task's
    files apart, so that a call closes its own files only."""
    from _bentoml_impl.client.base import ClientFileManager

    class TaskFileManager(ClientFileManager):
        def __init__(self) -> None:
            super().__init__()
            self.by_task: dict[asyncio.Task | None, list] = {}

        def get_file(self, value):
            file = super().get_file(value)
            self.by_task.setdefault(asyncio.current_task(), []).extend(self._opened_files)
            self._opened_files.clear()
            return file

        def close(self) -> None:
            for file in self.by_task.pop(asyncio.current_task(), []):
                file.close()

    return TaskFileManager()


class AsyncClient(_Base):
    """`async with AsyncClient(url) as client: await client.predict(...)`; concurrent predict
    calls share one connection pool."""

    def __init__(self, url: str = DEFAULT_URL, *, ready_timeout_s: float = 30.0, timeout_s: float = 60.0):
        super().__init__(url, ready_timeout_s, timeout_s)

    async def connect(self) -> "AsyncClient":
        try:
            await asyncio.to_thread(wait_ready, self.url, self.ready_timeout_s)
            from bentoml import AsyncHTTPClient

            self._bento = AsyncHTTPClient(self.url, server_ready_timeout=0, timeout=self.timeout_s)
            self._bento._file_manager = task_file_manager()
            try:
                await self._bento.__aenter__()  # reads /schema.json
            except Exception as e:
                raise _connect_error(e, self.url) from None
            _check_endpoints(self._bento, self.url)
            self._info = await self.fetch_model_info()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def fetch_model_info(self) -> ModelInfo:
        try:
            response = await self._bento.request("GET", "/model_info")
        except httpx.TransportError as e:
            raise _translate(e, self.url, []) from None
        return self._info_from(response)

    async def predict(self, inputs: Inputs, *, top_k: int = 1, experts: bool = True) -> list[Prediction]:
        """As Client.predict; the chunks of a large batch are sent concurrently."""
        chunks = _chunks(inputs, self._info.max_batch_size, Path(self._workdir.name))

        async def one(args, sources):
            try:
                answer = await self._bento.call("predict", **args, top_k=top_k, return_experts=experts)
            except Exception as e:
                raise _translate(e, self.url, sources) from None
            finally:
                _cleanup(args)
            return _parse(answer, sources, self.url)

        answers = await asyncio.gather(*(one(args, sources) for args, sources in chunks), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return [p for answer in answers for p in answer]

    async def aclose(self) -> None:
        if self._bento is not None:
            await self._bento.close()
            self._bento = None
        self._workdir.cleanup()

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def format_table(predictions: Sequence[Prediction]) -> str:
    """A plain-text table: file, class, probability, the other top-k classes and the experts."""
    rows = [("input", "class", "probability", "next classes", "experts")]
    for p in predictions:
        others = ", ".join(f"{s.label} ({s.probability:.3f})" for s in p.top_k[1:])
        experts = "-" if p.experts is None else _experts_cell(p.experts)
        rows.append((p.source, p.label, f"{p.probability:.3f}", others or "-", experts))
    keep = [i for i in range(5) if i < 3 or any(row[i] != "-" for row in rows[1:])]
    rows = [[row[i] for i in keep] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(keep))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _experts_cell(experts: Sequence[int]) -> str:
    """'1 (all 16 layers)' when one expert takes every MoE layer (a shared router), else one per layer."""
    if not experts:
        return "(dense)"
    if len(experts) > 1 and len(set(experts)) == 1:
        return f"{experts[0]} (all {len(experts)} layers)"
    return " ".join(map(str, experts))
