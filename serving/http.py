"""HTTP around the advmoe APIs: request parsing that turns every client mistake into a 4xx, the
one-line log and the metric of a refused request, and the request-body limit.

BentoML (1.4.40) parses a request before the API method runs, and what it makes of a malformed
one is a 500 (broken multipart; a text field where a file goes, which it even tries to fetch as
a URL) or a 400 logged as a server ERROR with a traceback (a field of the wrong type). The input
specs below keep BentoML's typed fields, so /docs.json and BentoML's clients see the same API,
but parse the request here: a file field takes uploaded files only (never a path on the server),
and a request that cannot be parsed reaches the API method as a pending `RequestError`, which
`client_errors` answers.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import bentoml
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from .inputs import RequestError, describe
from .metrics import metrics

logger = logging.getLogger("bentoml.advmoe")  # under BentoML's logger: its handlers and format
PENDING = "advmoe_rejection"  # where a parsing failure waits for the API method (request.state)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
ACCEPTED_TYPES = ("application/json", *FORM_TYPES)


class LenientInput(bentoml.IODescriptor):
    """An API's input: typed fields as BentoML documents them; parsed by `parse`, never raising."""

    @classmethod
    async def from_http_request(cls, request: Request, serde) -> "LenientInput":
        try:
            return await parse(cls, request)
        except RequestError as error:
            setattr(request.state, PENDING, error)
            return cls.model_construct(**{name: None for name, f in cls.model_fields.items() if f.is_required()})


async def parse(cls: type[LenientInput], request: Request) -> LenientInput:
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    files = set(cls.multipart_fields)
    if media_type in FORM_TYPES:
        data = await form_fields(request, files)
    else:
        body = await request.body()
        try:
            data = json.loads(body or b"{}")
        except (ValueError, RecursionError) as e:
            raise RequestError(400, "bad_json", f"the body is not valid JSON ({describe(e)})") from None
        if not isinstance(data, dict):
            raise RequestError(400, "bad_json", f"the body must be a JSON object of fields, got {type(data).__name__}")
        if files & data.keys():
            raise RequestError(400, "bad_field", f"{', '.join(sorted(files & data.keys()))}: upload files in a "
                                                 f"multipart/form-data request; JSON takes `inputs` (an array)")
    unknown = data.keys() - cls.model_fields.keys()
    if unknown:
        raise RequestError(400, "unknown_field", f"unknown field(s) {', '.join(sorted(map(repr, unknown)))}; the "
                                                 f"fields are: {', '.join(cls.model_fields)}")
    try:
        model = cls.model_validate({k: v for k, v in data.items() if k not in files})
    except ValidationError as e:
        form = media_type in FORM_TYPES
        raise RequestError(400, "bad_field", "; ".join(field_error(err, form) for err in e.errors()[:5])) from None
    for name in files & data.keys():  # the uploaded bytes, as they came
        setattr(model, name, data[name])
    return model


def field_error(err: dict, form: bool) -> str:
    """One pydantic error as `field: what is wrong`. A list field given one whole number (`labels=9`
    for one image) also gets the list to send, in the request's own syntax."""
    where = ".".join(map(str, err["loc"])) or "body"
    text = f"{where}: {err['msg']}"
    value = err.get("input")
    if err["type"] == "list_type" and len(err["loc"]) == 1 and type(value) is int:
        shown = f"{where}=[{value}] (a form field holds JSON)" if form else f'"{where}": [{value}]'
        text += f"; send a list, even of one: {shown}"
    return text


async def form_fields(request: Request, files: set[str]) -> dict:
    try:
        form = await request.form()
    except Exception as e:  # broken multipart: no boundary, a part cut short, ... (the client's bytes)
        raise RequestError(400, "bad_multipart", f"the multipart/form-data body cannot be parsed "
                                                 f"({describe(e)}); send it as curl -F or requests' files= do") from None
    data = {}
    for name in dict.fromkeys(form.keys()):
        values = form.getlist(name)
        if name in files:
            if not all(isinstance(v, UploadFile) for v in values):
                raise RequestError(400, "bad_field", f"{name} must be uploaded as a file (a part with a filename, "
                                                     f"curl -F {name}=@FILE), not as a text field")
            data[name] = [await v.read() for v in values]
            continue
        if len(values) > 1:
            raise RequestError(400, "bad_field", f"{name} is given {len(values)} times; give it once")
        value = values[0]
        if isinstance(value, UploadFile):
            value = (await value.read()).decode("utf-8", "replace")
        try:
            data[name] = json.loads(value)  # numbers, booleans and lists come as JSON text
        except ValueError:
            data[name] = value
    return data


def single_file(value: list[bytes] | bytes | Path | None, name: str) -> bytes | Path | None:
    """A field that takes one file: the upload, or a RequestError when several came."""
    if isinstance(value, list):
        if len(value) != 1:
            raise RequestError(400, "bad_field", f"{name} takes one file; got {len(value)}")
        return value[0]
    return value


def reject(ctx: bentoml.Context, endpoint: str, error: RequestError) -> JSONResponse:
    """The 4xx for a client's mistake: counted, logged in one line, answered with what to fix."""
    metrics().rejected.labels(endpoint, error.reason).inc()
    logger.info("%s %d %s: %s", endpoint, error.status, error.reason, error.message)
    ctx.response.status_code = error.status  # BentoML sets the status from the context
    return JSONResponse({"error": error.message}, status_code=error.status)


def client_errors(endpoint: str):
    """A request that could not be parsed, or a RequestError raised by the API method, becomes its
    4xx. The method takes `ctx: bentoml.Context` (BentoML answers with its status)."""

    def decorate(func):
        @functools.wraps(func)
        async def wrapper(self, ctx: bentoml.Context, *args, **kwargs):
            pending = getattr(ctx.request.state, PENDING, None)
            if pending is not None:
                return reject(ctx, endpoint, pending)
            try:
                return await func(self, ctx, *args, **kwargs)
            except RequestError as error:
                return reject(ctx, endpoint, error)

        return wrapper

    return decorate


class RequestGate:
    """In front of BentoML: 413 for a body over `max_bytes` (from its Content-Length or, when the
    body is chunked, as soon as the bytes read pass the limit) and 415 for a POST whose content
    type the APIs do not take, which BentoML would otherwise answer with an error and a traceback."""

    def __init__(self, app, max_bytes: int, routes: tuple[str, ...]):
        self.app, self.max_bytes, self.routes = app, max_bytes, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        if scope.get("method") == "POST" and scope.get("path") in self.routes:
            media_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower().decode(
                "latin-1")
            if media_type not in ACCEPTED_TYPES:
                return await self._reject(scope, send, RequestError(
                    415, "bad_content_type", f"content type {media_type!r}: send application/json or "
                                             f"multipart/form-data"))
        length = headers.get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._too_large(scope, send)
            return await self.app(scope, receive, send)
        # No length given (chunked): read the body up to the limit, then hand it on.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._too_large(scope, send)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, send):
        await self._reject(scope, send, RequestError(
            413, "body_too_large", f"request body over {self.max_bytes} bytes; send fewer or smaller inputs"))

    async def _reject(self, scope, send, error: RequestError):
        endpoint = scope.get("path", "").strip("/") or "/"
        metrics().rejected.labels(endpoint, error.reason).inc()
        logger.info("%s %d %s: %s", endpoint, error.status, error.reason, error.message)
        await JSONResponse({"error": error.message}, status_code=error.status)(scope, None, send)
