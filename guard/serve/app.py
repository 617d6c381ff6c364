"""The guard HTTP service: a `Guard` behind FastAPI and uvicorn, with dynamic batching and Prometheus metrics.

    serve("purified", host="127.0.0.1", port=8080)         # blocks until SIGTERM or Ctrl-C
    app = create_app(GuardService(guard.load("purified")))  # the ASGI app, to run under any ASGI server

Endpoints (docs/serving.md):

    GET  /healthz      200 {"status": "ready", ...} once the model is loaded; 503 while it loads
    POST /v1/classify  one image: the bytes of an image file as the body, Content-Type
                       application/octet-stream or image/*  ->  200, Guard.classify(image).to_dict()
                       a batch: Content-Type application/json, {"images": [base64 of an image file, ...]}
                       ->  200, {"results": [to_dict(), ...]} in the same order
    GET  /metrics      Prometheus text format (guard.serve.metrics)

Errors are JSON, {"error": REASON, "message": what is wrong and what to do}: 400 for a body
that is no readable image (bad bytes, a decompression bomb: guard.inputs decides, as for
library calls), an empty body or bad JSON; 413 for a body over `max_body_bytes` or more
than `max_images` images; 415 for another content type; 503 while loading or shutting
down; 500 for a failure of the model itself (logged). A refused request does not stop
the others.

Images are decoded and resized in a thread pool, never on the event loop; the resized
images of concurrent requests go through the dynamic batcher (guard.serve.batching) into
one `Guard.classify` call, which runs in its own thread. Results are the library's for the
same bytes: the batch call sees the same resized pixels, and an image's alert does not
depend on the rest of its batch (guard.alerts); only the last bits of the floats may differ
from a one-image call where the backend's matrix products round differently for another
batch size (`Classification.agrees_with`; torch's CPU kernels do, by about 1e-7).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import ArtifactError, ClosedError, InputError
from ..inputs import resize_batch
from ..runtime import Guard, load, model_kind
from .batching import DynamicBatcher, Unbatched
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)

CLASSIFY_PATH = "/v1/classify"
ENDPOINTS = ("/healthz", CLASSIFY_PATH, "/metrics")
SINGLE_IMAGE_TYPES = ("application/octet-stream",)  # and every image/* type
BATCH_TYPE = "application/json"


@dataclass(frozen=True)
class ServeConfig:
    """How the service batches, limits and answers requests.

    max_batch, max_wait_ms: dynamic batching gathers up to max_batch images of concurrent
    requests, waiting at most max_wait_ms after the first. The default wait, 0, takes what is
    queued when the model is free (Triton's default too): under load the next batch fills while
    one runs, and a lone request never waits for a timer (which oversleeps on a loaded machine;
    docs/benchmarks/serve.md). A wait fills batches at moderate load, at its cost in latency.
    batching=False runs one model
    call per image instead (concurrently, `threads` at a time). max_body_bytes: the largest
    request body; max_images: the most images in one JSON request. alerts: compute the
    trigger alert (1 + K forward rows per image) or classify only. threads: the pool that
    decodes images. shutdown_timeout: seconds to let in-flight requests finish on SIGTERM.
    torch_threads: torch's intra-op threads, set for the whole process before the model
    loads (loading folds the prompts into attention keys and values, which round
    differently with other thread counts); None: torch's default on the torch backend, 1
    on the others once the model has loaded, whose engines have their own thread pool.
    There the torch work around the engine (resizing, the alert's perturbations and score)
    is small, and two pools spin-waiting on the same cores made one onnxruntime call of
    the tiny model take 60 ms instead of 2 (docs/serving.md)."""
    max_batch: int = 32
    max_wait_ms: float = 0.0
    batching: bool = True
    max_body_bytes: int = 16 * 2 ** 20
    max_images: int = 64
    alerts: bool = True
    threads: int = 4
    shutdown_timeout: int = 30
    torch_threads: Optional[int] = None

    def __post_init__(self):
        for name in ("max_batch", "max_body_bytes", "max_images", "threads", "shutdown_timeout", "torch_threads"):
            value = getattr(self, name)
            if name == "torch_threads" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) \
                or not 0 <= self.max_wait_ms <= 10_000:
            raise InputError(f"max_wait_ms must lie in [0, 10000] milliseconds, got {self.max_wait_ms!r}")


class RequestError(InputError):
    """A request the service refuses: answered with `status` and {"error": reason, "message": ...}."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason


class GuardService:
    """The model, its batcher, thread pools and metrics; `create_app` puts HTTP in front of it.

    model: a loaded Guard, or a function that loads one; it is then called in a thread when
    the service starts, so that the server answers (503) while the model loads."""

    def __init__(self, model: Union[Guard, Callable[[], Guard]], config: ServeConfig = ServeConfig()):
        self.config = config
        self.metrics = ServiceMetrics()
        self._loader = (lambda: model) if isinstance(model, Guard) else model
        self.model: Optional[Guard] = None
        self.load_error: Optional[BaseException] = None
        self.on_load_error: Optional[Callable[[BaseException], None]] = None
        self.on_ready: Optional[Callable[[Guard], None]] = None
        self._loading: Optional[asyncio.Task] = None
        self._stopped = False
        self._decode_pool = ThreadPoolExecutor(config.threads, thread_name_prefix="guard-decode")
        # With batching, one batch runs at a time and the next gathers meanwhile; without, calls run side by side.
        self._model_pool = ThreadPoolExecutor(1 if config.batching else config.threads,
                                              thread_name_prefix="guard-model")
        if config.batching:
            self.batcher = DynamicBatcher(self._run_batch, self._model_pool, config.max_batch,
                                          config.max_wait_ms / 1000)
        else:
            self.batcher = Unbatched(self._run_batch, self._model_pool)
        self.metrics.queued.set_function(lambda: self.batcher.queued)

    @property
    def state(self) -> str:
        """loading, ready, failed (the model did not load) or stopped."""
        if self._stopped:
            return "stopped"
        if self.load_error is not None:
            return "failed"
        return "loading" if self.model is None else "ready"

    async def start(self) -> None:
        """Start the batcher and load the model in the background."""
        self.batcher.start()
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="guard-load")

    async def _load(self) -> None:
        def load() -> Guard:
            if self.config.torch_threads is not None:  # set in the loading thread: OpenMP keeps the count per thread
                torch.set_num_threads(self.config.torch_threads)
            return self._loader()

        try:
            model = await asyncio.get_running_loop().run_in_executor(self._decode_pool, load)
        except Exception as error:  # noqa: BLE001 - reported by /healthz, and to on_load_error (the CLI exits)
            self.load_error = error
            log.error("the model did not load: %s", error)
            if self.on_load_error is not None:
                self.on_load_error(error)
            return
        torch_threads = self.config.torch_threads or (None if model.backend == "torch" else 1)
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.model = model
        alert = model.alert_config
        self.metrics.model_info.info({"backend": model.backend, "device": str(model.device),
                                      "classes": str(len(model.classes)), "statistic": alert.statistic,
                                      "threshold": "none" if alert.threshold is None else repr(alert.threshold)})
        self.metrics.model_loaded.set(1)
        log.info("ready: %r", model)
        if self.on_ready is not None:
            self.on_ready(model)

    async def stop(self) -> None:
        """Run what is queued, then close the model and the pools (requests answered 503 from now on)."""
        if self._loading is not None:
            await self._loading  # a model still loading is closed once it is loaded
        await self.batcher.stop()
        self._stopped = True
        if self.model is not None:
            self.model.close()
            self.metrics.model_loaded.set(0)
        self._model_pool.shutdown(wait=True)
        self._decode_pool.shutdown(wait=True)

    def health(self) -> tuple[int, dict]:
        state = self.state
        body = {"status": state, "clip_guard_version": __version__}
        if state == "ready":
            model = self.model
            body.update(backend=model.backend, device=str(model.device), classes=len(model.classes),
                        alert_statistic=model.alert_config.statistic, alert_threshold=model.alert_config.threshold,
                        max_batch=self.batcher.max_batch, max_wait_ms=1000 * self.batcher.max_wait)
        elif state == "failed":
            body["error"] = str(self.load_error)
        return (200 if state == "ready" else 503), body

    async def classify(self, blobs: list[bytes], names: list[str]) -> list:
        """Classifications of encoded images (one per blob, in order); names: how errors call each."""
        model = self.require_ready()
        images = await self.in_pool(_decode, model, blobs, names)
        try:
            return list(await asyncio.gather(*(self.batcher.submit(image) for image in images)))
        except ClosedError as error:
            raise RequestError(503, "shutting_down", f"{error}; retry on another instance") from error

    async def in_pool(self, function, *args):
        """function(*args) in the decoding pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, function, *args)

    def require_ready(self) -> Guard:
        """The model; a 503 RequestError while it loads, if it failed, or once stopping."""
        if self.state != "ready":
            detail = {"loading": "the model is still loading; retry when GET /healthz answers 200",
                      "failed": f"the model did not load ({self.load_error})",
                      "stopped": "the service is shutting down; retry on another instance"}[self.state]
            raise RequestError(503, "not_ready", detail)
        return self.model

    def _run_batch(self, images: list[torch.Tensor]) -> list:
        """One backend call for the resized images of a batch (in the model thread)."""
        model = self.model
        started = time.perf_counter()
        results = model.classify(images, batch_size=len(images), alerts=self.config.alerts)
        self.metrics.observe_batch(len(images), time.perf_counter() - started, model.alert_config.statistic,
                                   [result.alert_status for result in results])
        return results


def _decode(model: Guard, blobs: list[bytes], names: list[str]) -> list[torch.Tensor]:
    """Each encoded image decoded and resized as Guard.classify does it (guard.inputs: the same
    checks, bombs refused from the header), so the batch call only runs the model."""
    images = []
    for blob, name in zip(blobs, names):
        handle = io.BytesIO(blob)
        handle.name = name  # guard.inputs names the file object in its messages
        try:
            images.append(resize_batch([handle], model.preprocess, torch.device("cpu"), first_index=None)[0])
        except InputError as error:
            raise RequestError(400, "bad_image", str(error)) from error
    return images


# --- HTTP ---------------------------------------------------------------------------------

class _Observe:
    """ASGI middleware: counts and times every HTTP request (clip_guard_requests_total and
    clip_guard_request_latency_seconds, by endpoint; unknown paths are 'other')."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500  # if the app fails before it starts a response

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.in_progress.dec()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            self.metrics.requests.labels(endpoint, str(status)).inc()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it exceeds limit bytes, declared or not."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "bad_content_length", f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise RequestError(413, "body_too_large", f"the body has {int(declared):,} bytes, more than this "
                               f"service accepts ({limit:,}; `--max-body-bytes`); downscale or recompress the image")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"the body has more than {limit:,} bytes, more than this "
                               "service accepts (`--max-body-bytes`); downscale or recompress the image")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_batch(body: bytes, max_images: int) -> list[bytes]:
    """{"images": [base64, ...]} -> the encoded images (in a thread: large bodies take a while)."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, "bad_json", f"the body is not valid JSON ({error})") from error
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise RequestError(400, "bad_json", 'expected a JSON object {"images": [base64 of an image file, ...]}')
    if not images:
        raise RequestError(400, "no_images", '"images" is empty: send at least one image')
    if len(images) > max_images:
        raise RequestError(413, "too_many_images", f"{len(images)} images in one request, more than this service "
                           f"accepts ({max_images}; `--max-images`); split the request")
    blobs = []
    for index, item in enumerate(images):
        try:
            if not isinstance(item, str):
                raise TypeError(f"a {type(item).__name__}, not a string")
            blobs.append(base64.b64decode(item, validate=True))
        except (TypeError, binascii.Error) as error:
            raise RequestError(400, "bad_base64", f"images[{index}] is not the base64 of an image file ({error})") \
                from error
    return blobs


def _error(status: int, reason: str, message: str, metrics: ServiceMetrics) -> JSONResponse:
    metrics.errors.labels(reason).inc()
    return JSONResponse({"error": reason, "message": message}, status_code=status)


# The request body in the OpenAPI schema (GET /docs): the endpoint reads it itself.
_CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    BATCH_TYPE: {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "byte"}}}}}}}}


def create_app(service: GuardService) -> FastAPI:
    """The ASGI application serving `service`; it starts the service (and the model's loading)
    on startup and stops it, letting in-flight requests finish, on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="clip-guard", version=__version__, lifespan=lifespan,
                  description="Classify images with a purified CLIP and its trigger alert.")
    app.add_middleware(_Observe, metrics=service.metrics)
    metrics = service.metrics

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return _error(error.status, error.reason, str(error), metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        reason = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return _error(error.status_code, reason, f"{request.method} {request.url.path}: {error.detail}; the "
                      f"endpoints are GET /healthz, POST {CLASSIFY_PATH}, GET /metrics", metrics)

    @app.get("/healthz")
    async def healthz():
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.post(CLASSIFY_PATH, openapi_extra=_CLASSIFY_BODY)
    async def classify(request: Request):
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        single = media_type in ("", *SINGLE_IMAGE_TYPES) or media_type.startswith("image/")
        if not single and media_type != BATCH_TYPE:
            raise RequestError(415, "unsupported_media_type", f"Content-Type {media_type!r}: send one image file "
                               "as application/octet-stream (curl -H 'Content-Type: application/octet-stream' "
                               f"--data-binary @image.png) or a batch as {BATCH_TYPE} "
                               '{"images": [base64 of an image file, ...]}')
        service.require_ready()  # before reading the body: a loading service answers at once
        body = await _read_body(request, service.config.max_body_bytes)
        if single:
            if not body:
                raise RequestError(400, "empty_body", "the body is empty: send the bytes of an image file")
            blobs, names = [body], ["request body"]
        else:
            blobs = await service.in_pool(_parse_batch, body, service.config.max_images)
            names = [f"images[{index}]" for index in range(len(blobs))]
        try:
            results = await service.classify(blobs, names)
        except RequestError:
            raise
        except Exception as error:  # noqa: BLE001 - the model failed: answer 500, keep serving
            log.exception("classifying %d images failed", len(blobs))
            return _error(500, "internal", f"the model failed on this request ({type(error).__name__}: {error}); "
                          "see the service log", metrics)
        if single:
            return JSONResponse(results[0].to_dict())
        return JSONResponse({"results": [result.to_dict() for result in results]})

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app


# --- running it ---------------------------------------------------------------------------

def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free port; read it from getsockname)."""
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0][:3]
    except socket.gaierror as error:
        raise InputError(f"--host {host!r} is not an address or name this machine resolves ({error})") from error
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only on sockets that say they are TCP, and
    # with it on, a response's header and body writes wait for the client's delayed ACK (40 ms a request)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port or stop "
                         "what is using it") from error
    return sock


def _ignore_signal(signum, frame) -> None:
    """Installed for SIGTERM while uvicorn runs (see serve)."""


def serve(model_path: Union[str, Path], *, host: str = "127.0.0.1", port: int = 8080, backend: str = "auto",
          device=None, config: ServeConfig = ServeConfig(), status: Optional[Callable[[str], None]] = None) -> None:
    """Serve the model at model_path (anything guard.load reads) until SIGTERM or Ctrl-C.

    The socket listens before the model loads (GET /healthz answers 503 until it has loaded).
    On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish (at most
    config.shutdown_timeout seconds), then the service closes the model and serve returns;
    Ctrl-C does the same and then raises KeyboardInterrupt. A model that fails to load stops
    the server and its error is raised. status(line): progress for the operator."""
    import uvicorn

    say = status or (lambda line: log.info("%s", line))
    path = Path(model_path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact directory or compiled model")
    model_kind(path)  # a file that is no model is a usage error, before anything listens
    sock = listen(host, port)
    bound = sock.getsockname()
    service = GuardService(lambda: load(path, backend=backend, device=device), config)
    server = uvicorn.Server(uvicorn.Config(create_app(service), lifespan="on", log_config=None, access_log=False,
                                           timeout_graceful_shutdown=config.shutdown_timeout))

    def failed(error: BaseException) -> None:
        server.should_exit = True

    def ready(model: Guard) -> None:
        alert = model.alert_config
        batching = (f"dynamic batching up to {config.max_batch} images, {config.max_wait_ms:g} ms wait"
                    if config.batching else "no dynamic batching")
        say(f"ready: {path} on {model.backend} ({model.device}), {len(model.classes)} classes, alert "
            f"{alert.statistic} {'uncalibrated' if alert.threshold is None else f'threshold {alert.threshold:.6g}'}"
            f"{'' if config.alerts else ' (off)'}; {batching}")

    service.on_load_error, service.on_ready = failed, ready
    host_text = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    say(f"listening on http://{host_text}:{bound[1]} (pid {os.getpid()}); loading {path}")
    # uvicorn re-raises the signal it stopped on, once shut down, to the handler it found: for SIGTERM
    # (a supervisor's stop) one that does nothing, so that a graceful shutdown returns normally.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _ignore_signal) if main_thread else None
    try:
        server.run(sockets=[sock])
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
    if service.load_error is not None:
        raise service.load_error
    say("stopped")
