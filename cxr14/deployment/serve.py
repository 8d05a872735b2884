"""`cxr14-serve`: the exported model over HTTP, speaking the Open Inference Protocol v2 (OIP, KServe v2 / Triton
REST), with a plain upload endpoint that answers what `cxr14-predict --json` prints, and a page at `/`.

Starlette on uvicorn: the ASGI core FastAPI is built on, without pydantic (the protocol's few JSON shapes are
checked by hand, into the project's one-line errors), and uvicorn's graceful shutdown (SIGTERM: stop listening,
answer what was accepted, exit) and `--workers N` come with it. The model's work reuses predict's functions
(`decode_or_reason`, `rows_for`, `image_result`, `heatmap_classes`, the engines), so a result cannot drift from
the command's.

Concurrent requests share model calls (`Batcher`): images decoded in a thread pool (off the event loop) go from
the decoding thread straight to one model thread, which takes up to `max_batch` images at a time, waiting at most
`max_wait_ms` for more only while other images are still decoding, so a lone request never waits; probabilities
are calibrated there too, a batch at a time. Measured at 16 clients on 2 cores: the event loop's share of the CPU
fell from 16% to 11% of the wall time and throughput rose 157 -> 167 images/s against the loop-centred design
(decode in the pool, back to the loop, queue, model thread, calibrate on the loop). Nothing a request carries is
written to disk (multipart bodies are parsed in memory) or to the log, which holds a request id, byte counts,
timings and the outcome (`Guard`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import itertools
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr14.runtime.errors import PipelineError

MODEL_NAME, MODEL_VERSION = "cxr14", "1"
TOKEN_ENV = "CXR14_SERVE_TOKEN"
OPTIONS_ENV = "CXR14_SERVE_OPTIONS"  # how `--workers N` hands the options to each worker process
PAGE = Path(__file__).with_name("static") / "index.html"
UPLOAD_TYPES = ("image/png", "image/jpeg", "application/dicom", "application/octet-stream")
INFER_TYPES = ("application/json", "application/octet-stream")
OUTPUTS = {"probabilities": "FP32", "calibrated": "FP64", "decisions": "INT8"}  # decisions: 1 POS, 0 NEG, -1 n/a
DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT8": np.int8, "UINT8": np.uint8}
log = logging.getLogger("cxr14.serve")


@dataclass(frozen=True)
class Options:
    """What `cxr14-serve` runs: predict's model choice (`cxr14.deployment.predict.open_engine`) and the service's
    limits."""

    model: str | None = None
    engine: str = "onnx"
    precision: str = "auto"
    device: str | None = None
    thresholds: str | None = None
    calibrator: str | None = None
    params: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 10.0
    threads: int | None = None
    max_body_mb: float = 32.0
    max_pixels: int = 50_000_000


class Fail(Exception):
    """A request refused: its HTTP status and a one-line message, sent as {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Model:
    """An engine with the thresholds and calibrator its decisions use, as predict opens them."""

    engine: Any
    thresholds: dict
    calibrator: dict | None
    voi: bool

    @property
    def classes(self) -> list[str]:
        return self.engine.classes

    @property
    def heatmaps(self) -> bool:
        """Whether this engine draws heatmaps: predict's torch engine, and the onnx one where its file has the `cam`
        output (every file the export stage writes since it has one)."""
        return self.engine.name == "torch" or self.engine.cam is not None


def load(options: Options) -> Model:
    """The engine, thresholds and calibrator exactly as `cxr14-predict` with the same options opens them; a
    foreign, stale or missing model file is a PipelineError in one line."""
    from cxr14.deployment import predict
    from cxr14.params import PARAMS_FILE

    params = Path(options.params) if options.params else (PARAMS_FILE if PARAMS_FILE.is_file() else None)
    where = predict.settings(params, options.device)
    model = Path(options.model) if options.model else None
    if model is None and options.engine == "torch":
        from cxr14 import paths

        model = paths.MODEL
    engine = predict.open_engine(options.engine, model, options.precision, where)
    thresholds, calibrator = predict.calibration(engine, Path(options.thresholds) if options.thresholds else None,
                                                 Path(options.calibrator) if options.calibrator else None)
    return Model(engine, thresholds, calibrator, where.dicom_voi)


@dataclass
class Job:
    """One item for the model thread: images to run in a shared call, or other work (heatmaps) run alone in turn;
    `done(value, error)` hands the outcome back to the request waiting for it."""

    images: np.ndarray | None
    work: Callable[[], Any] | None
    done: Callable[[Any, BaseException | None], None]


def resolver(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> Callable[[Any, BaseException | None], None]:
    """A `Job.done` for another thread: settles `future` on its event loop (unless the request is gone)."""

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():  # the client went away meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def done(value: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed at shutdown: nobody is waiting any more
            loop.call_soon_threadsafe(settle, value, error)

    return done


class Batcher:
    """Images from concurrent requests into shared model calls, one call at a time on the model's own thread.

    The decoding threads hand their images straight to this thread (`put`), which wakes at once, without a trip
    through the event loop between decoding and the model; results go back to the loop with
    `call_soon_threadsafe`. It takes up to `max_batch` images at a time and waits up to `max_wait_s` for more
    only while images are still being decoded (`expect`), so a lone request never waits."""

    def __init__(self, run: Callable[[np.ndarray], tuple[np.ndarray | None, ...]], max_batch: int,
                 max_wait_s: float) -> None:
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.incoming = 0  # images being decoded now, which will come: worth waiting for
        self.calls: list[int] = []  # images per model call (the last 1000), for the tests and the log
        self.jobs: list[Job] = []
        self.changed = threading.Condition()
        self.busy = False  # a model call is running (here or on a decoding thread: `run_now_or_put`)
        self.closed = False
        self.thread = threading.Thread(target=self.serve_jobs, name="cxr14-model", daemon=True)
        self.thread.start()

    def expect(self) -> None:
        """An image is being decoded: the model thread may wait for it to share a call."""
        with self.changed:
            self.incoming += 1

    def unexpect(self) -> None:
        """An expected image will not come (its decoding failed)."""
        with self.changed:
            self.incoming -= 1
            self.changed.notify()

    def put(self, job: Job, expected: bool = False) -> None:
        """Queue a job, from any thread; `expected`: its image was announced by `expect`."""
        with self.changed:
            if self.closed:
                raise RuntimeError("the model thread has stopped")
            self.incoming -= expected
            self.jobs.append(job)
            self.changed.notify()

    def run_now_or_put(self, job: Job) -> None:
        """From a decoding thread, an image announced by `expect`: run at once on this thread when the model is
        idle and no other image is queued or decoding (a lone request: no hand-over to the model thread, whose
        cold start cost ~1 ms a request, measured), else queued for a shared call."""
        with self.changed:
            alone = not self.jobs and not self.busy and not self.closed and self.incoming == 1
            if alone:
                self.busy, self.incoming = True, 0
        if not alone:
            self.put(job, expected=True)
            return
        try:
            self.execute([job])
        finally:
            with self.changed:
                self.busy = False
                self.changed.notify_all()

    async def submit(self, images: np.ndarray, expected: bool = False) -> tuple[np.ndarray | None, ...]:
        """The model's outputs for uint8 images (n, S, S): `run`'s arrays, each sliced to these images."""
        future = asyncio.get_running_loop().create_future()
        self.put(Job(images, None, resolver(asyncio.get_running_loop(), future)), expected)
        return await future

    async def in_model_thread(self, work: Callable[[], Any]) -> Any:
        """Other work on the model (heatmaps), in turn with the batches."""
        future = asyncio.get_running_loop().create_future()
        self.put(Job(None, work, resolver(asyncio.get_running_loop(), future)))
        return await future

    def serve_jobs(self) -> None:
        while True:
            with self.changed:
                while (not self.jobs or self.busy) and not (self.closed and not self.busy):
                    self.changed.wait()
                if not self.jobs:  # closed, and nothing left to answer
                    return
                batch = self.next_batch()
                self.busy = True
            try:
                self.execute(batch)
            finally:
                with self.changed:
                    self.busy = False
                    self.changed.notify_all()

    def next_batch(self) -> list[Job]:
        """The jobs of the next model call (the lock held): the first, and the images after it up to `max_batch`,
        waiting for images still decoding while there is room and time."""
        if self.jobs[0].work is not None:
            return [self.jobs.pop(0)]
        deadline = time.monotonic() + self.max_wait_s
        while self.incoming > 0 and not self.closed:
            queued = sum(len(j.images) for j in itertools.takewhile(lambda j: j.images is not None, self.jobs))
            left = deadline - time.monotonic()
            if queued >= self.max_batch or left <= 0:
                break
            self.changed.wait(left)
        batch, count = [], 0
        while self.jobs and self.jobs[0].images is not None and count < self.max_batch:
            batch.append(self.jobs.pop(0))
            count += len(batch[-1].images)
        return batch

    def execute(self, batch: list[Job]) -> None:
        if batch[0].work is not None:
            try:
                value = batch[0].work()
            except Exception as exc:
                batch[0].done(None, exc)
            else:
                batch[0].done(value, None)
            return
        images = np.concatenate([j.images for j in batch])
        self.calls = [*self.calls[-999:], len(images)]
        try:
            outputs = self.run(images)
        except Exception as exc:  # the engine failed: every request in the batch is answered with it
            for job in batch:
                job.done(None, exc)
            return
        start = 0
        for job in batch:
            n = len(job.images)
            job.done(tuple(None if o is None else o[start:start + n] for o in outputs), None)
            start += n

    def close(self) -> None:
        """Answer what is queued, then stop the thread."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        self.thread.join(60)


class Service:
    """The state one worker process keeps: options, the model once loaded, the batcher and the decoding pool."""

    def __init__(self, options: Options, model: Model | None = None,
                 loader: Callable[[Options], Model] = load) -> None:
        from cxr14.runtime.devices import cpu_count

        self.options, self.model, self.loader = options, model, loader
        self.load_error: str | None = None
        self.decoders = ThreadPoolExecutor(options.threads or cpu_count(), thread_name_prefix="cxr14-decode")
        self.batcher: Batcher | None = None
        self.ids = itertools.count(1)
        self.prefix = f"{os.getpid():x}"

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        self.batcher = Batcher(self.outputs, self.options.max_batch, self.options.max_wait_ms / 1000)
        if self.model is None:  # a worker of `--workers N`: uvicorn accepts its first connection after this
            await asyncio.to_thread(self.load_model)  # so no request meets a worker still loading (503)
            if self.model is None:
                self.batcher.close()
                raise PipelineError(f"model not loaded: {self.load_error}")
        try:
            yield
        finally:
            self.batcher.close()
            self.decoders.shutdown(wait=False, cancel_futures=True)

    def load_model(self) -> None:
        try:
            self.model = self.loader(self.options)
        except PipelineError as exc:
            self.load_error = str(exc)
            log.error("model not loaded: %s", exc)

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Raw and calibrated probabilities (n, C) and out-of-distribution scores (n,) (None: the model has none),
        from one pass, on the model thread: calibrated there a batch at a time, off the event loop."""
        from cxr14.evaluation.calibration import apply_calibrator

        model = self.ready_model()
        raw, ood = model.engine.run(images)
        return raw, apply_calibrator(model.calibrator, raw, model.classes) if model.calibrator else raw, ood

    def ready_model(self) -> Model:
        if self.model is None:
            raise Fail(503, f"model not loaded ({self.load_error})" if self.load_error else "model is loading")
        return self.model

    async def predict_file(self, data: bytes, what: str, scope: dict) -> Prediction:
        """One encoded image (PNG, JPEG, DICOM) decoded in the decoding pool, whose thread then hands it to the
        model thread; its prediction comes back to this request."""
        model = self.ready_model()
        batcher = self.batcher
        assert batcher is not None
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        answer, start = resolver(loop, future), time.perf_counter()

        def decode_then_queue() -> None:
            try:
                image, notes, tags = decode_checked(data, model.engine.image_size, model.voi,
                                                    self.options.max_pixels, what)
            except BaseException as exc:  # refused (Fail): answered, and no longer waited for
                batcher.unexpect()
                answer(None, exc)
                return
            decoded = time.perf_counter()
            try:
                batcher.run_now_or_put(Job(image[None], None, lambda out, error: answer(
                    None if error else Prediction(image, notes, tags, out[0][0], out[1][0],
                                                  None if out[2] is None else float(out[2][0]), decoded), error)))
            except RuntimeError as exc:  # the model thread has stopped (shutting down)
                batcher.unexpect()
                answer(None, exc)

        batcher.expect()
        try:
            self.decoders.submit(decode_then_queue)
        except RuntimeError:  # shutting down
            batcher.unexpect()
            raise
        result = await future
        timing(scope, "decode_ms", result.decoded - start)
        timing(scope, "model_ms", time.perf_counter() - result.decoded)
        return result

    async def forward(self, images: np.ndarray, scope: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`outputs` for images already decoded (OIP's uint8 tensor), through the batcher."""
        self.ready_model()
        assert self.batcher is not None
        start = time.perf_counter()
        raw, cal, ood = await self.batcher.submit(images)
        timing(scope, "model_ms", time.perf_counter() - start)
        return raw, cal, ood


@dataclass(frozen=True)
class Prediction:
    """One decoded image's input and outputs: the model's uint8 (S, S) input (for heatmaps), decoding's warnings
    and DICOM tags, raw and calibrated probabilities (C,), the out-of-distribution score, and when decoding
    ended (perf_counter: the log's timings)."""

    image: np.ndarray
    notes: list[str]
    tags: Any
    raw: np.ndarray
    cal: np.ndarray
    ood: float | None
    decoded: float


def timing(scope: dict, key: str, seconds: float) -> None:
    """A request's timing for its log line (the longest, where images of one request overlap)."""
    timings = scope.setdefault("state", {}).setdefault("cxr14_timings", {})
    timings[key] = max(timings.get(key, 0.0), 1000 * seconds)


def decode_checked(data: bytes, size: int, voi: bool, max_pixels: int, what: str
                   ) -> tuple[np.ndarray, list[str], Any]:
    """`decode_or_reason` on bytes held in memory, after a look at the header: an image of more than `max_pixels`
    pixels (a decompression bomb: a small file that decodes to gigabytes) is refused before it is decoded."""
    from cxr14.deployment.predict import decode_or_reason

    pixels = declared_pixels(data)
    if pixels is not None and pixels > max_pixels:
        raise Fail(413, f"{what}: {pixels} pixels, over the limit of {max_pixels} (--max-pixels)")
    image, notes, tags = decode_or_reason(data, size, voi)
    if isinstance(image, str):  # Pillow names its file object: <_io.BytesIO object at 0x...> says nothing here
        raise Fail(422, f"{what}: {re.sub(r' ?<_io.BytesIO object at 0x[0-9a-f]+>', '', image)}")
    return image, notes, tags


def declared_pixels(data: bytes) -> int | None:
    """The pixel count an image's header declares (frames included for DICOM); None where the header is not
    readable (the decoder then says why)."""
    from PIL import Image

    from cxr14.data.dicom import is_dicom, quiet_pydicom
    from cxr14.data.images import open_image

    if is_dicom(data):
        import pydicom

        quiet_pydicom()
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1)
                                                                                       or 1)
        except Exception:  # the decoder says why in its words
            return None
    try:
        with open_image(data) as image:
            return image.width * image.height
    except Image.DecompressionBombError:  # over twice Pillow's own limit: refused by Pillow at the header
        return 2**62
    except Exception:
        return None


def heatmap_png(heat: np.ndarray) -> str:
    """A heatmap (S, S) in [0, 1] as a base64 PNG: jet colours, transparent where the map is cold, to lay over
    the image (the model's input is the image stretched to a square, so stretched back it covers the image)."""
    from PIL import Image

    from cxr14.explanation.heatmaps import jet  # no PyTorch: the onnx engine draws heatmaps too

    heat = np.clip(np.asarray(heat, dtype=np.float64), 0, 1)
    rgba = np.dstack([jet(heat), np.rint(210 * heat**0.75).astype(np.uint8)])
    out = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(out, format="png")
    return base64.b64encode(out.getvalue()).decode("ascii")


ASGI = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class Guard:
    """Outermost ASGI layer: the API token on every request (when set), a request id, and one log line per
    request: id, method, path (never the query, which may hold the token), status, bytes in and out, timings,
    outcome. No body, file name, pixel or DICOM tag is logged."""

    def __init__(self, app: ASGI, service: Service, token: str | None) -> None:
        self.app, self.service, self.token = app, service, token

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = f"{self.service.prefix}-{next(self.service.ids)}"
        start, seen = time.perf_counter(), {"in": 0, "out": 0, "status": 0}
        scope.setdefault("state", {})["cxr14_timings"] = {}

        async def counted_receive() -> dict:
            message = await receive()
            seen["in"] += len(message.get("body", b""))
            return message

        async def tagged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        if self.token is not None and not self.authorized(scope):
            await error_response(401, "missing or wrong API token (Authorization: Bearer TOKEN)")(scope, receive,
                                                                                                    tagged_send)
        else:
            await self.app(scope, counted_receive, tagged_send)
        timings = " ".join(f"{k}={v:.1f}" for k, v in scope["state"]["cxr14_timings"].items())
        outcome = "ok" if seen["status"] < 400 else "refused" if seen["status"] < 500 else "failed"
        log.info("%s %s %s %d in=%dB out=%dB %s total_ms=%.1f %s", rid, scope["method"], scope["path"],
                 seen["status"], seen["in"], seen["out"], timings, 1000 * (time.perf_counter() - start), outcome)

    def authorized(self, scope: dict) -> bool:
        assert self.token is not None
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.token.encode()):
            return True
        if scope["path"] == "/" and scope["method"] == "GET":  # the page only: a browser cannot send the header
            from urllib.parse import parse_qs

            query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
            return hmac.compare_digest(query.encode(), self.token.encode())
        return False


def error_response(status: int, message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


async def read_body(request: Any, limit_mb: float) -> bytes:
    """The whole body, refused (413) as soon as it passes the limit: by its declared length before reading."""
    limit = int(limit_mb * 1024 * 1024)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Fail(413, f"body of {declared} bytes, over the limit of {limit} (--max-body-mb)")
    if request.headers.get("content-encoding", "identity") != "identity":
        raise Fail(415, f"Content-Encoding {request.headers['content-encoding']}: expected none (identity)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Fail(413, f"body over the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Any) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each file part, parsed in memory: Starlette's form parser spools parts over 1 MB to a
    temporary file, and no image may reach the disk."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise Fail(400, "multipart/form-data body without a boundary")
    parts: list[tuple[dict, bytes]] = []
    part: dict[str, Any] = {}

    def begin() -> None:
        part.update(headers={}, data=[], field=b"", value=b"")

    def add(key: str) -> Callable[[bytes, int, int], None]:
        return lambda data, start, end: part[key].append(data[start:end]) if key == "data" else \
            part.__setitem__(key, part[key] + data[start:end])

    def header_end() -> None:
        part["headers"][part["field"].lower()] = part["value"]
        part["field"], part["value"] = b"", b""

    callbacks = {"on_part_begin": begin, "on_header_field": add("field"), "on_header_value": add("value"),
                 "on_header_end": header_end, "on_part_data": add("data"),
                 "on_part_end": lambda: parts.append((part["headers"], b"".join(part["data"])))}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except Exception as exc:
        raise Fail(400, f"malformed multipart/form-data body ({' '.join(str(exc).split())[:200]})") from None
    files = []
    for headers, data in parts:
        options = parse_options_header(headers.get(b"content-disposition", b""))[1]
        if b"filename" in options:
            files.append((options[b"filename"].decode("utf-8", "replace"), data))
    if not files:
        raise Fail(400, "multipart/form-data body without a file part (curl -F file=@image.png)")
    return files


def wanted_heatmaps(request: Any, model: Model) -> str | list[str] | None:
    """?heatmaps=auto (predict's choice: the positive findings, else the nearest), all, or finding names."""
    asked = request.query_params.get("heatmaps")
    if asked in (None, "", "none", "false", "0"):
        return None
    if not model.heatmaps:
        raise Fail(400, "heatmaps: this engine cannot draw them (an ONNX file exported before its cam output: run "
                        "the export stage again); or start cxr14-serve with --engine torch")
    if asked in ("auto", "all"):
        return asked
    names = [n.strip() for n in asked.split(",")]
    unknown = [n for n in names if n not in model.classes]
    if unknown:
        raise Fail(400, f"heatmaps: unknown finding {unknown[0]}; expected auto, all or names from "
                        f"{', '.join(model.classes)}")
    return names


async def upload(request: Any) -> Any:
    """POST /predict: images as multipart/form-data files (or one as the raw body); `cxr14-predict --json`'s
    document for them, each with `heatmaps` (finding -> base64 PNG) when asked and `warnings` when there are."""
    from starlette.responses import JSONResponse

    service: Service = request.app.state.service
    model = service.ready_model()
    kind = media_type(request)
    if kind != "multipart/form-data" and kind not in UPLOAD_TYPES:
        raise Fail(415, f"Content-Type {kind or '(none)'}: expected multipart/form-data or one of "
                        f"{', '.join(UPLOAD_TYPES)}")
    heat = wanted_heatmaps(request, model)
    body = await read_body(request, service.options.max_body_mb)
    files = (parse_multipart(body, request.headers["content-type"]) if kind == "multipart/form-data"
             else [(request.query_params.get("name", "upload"), body)])
    done = await asyncio.gather(*(service.predict_file(data, name, request.scope) for name, data in files))
    results = predict_results(model, [n for n, _ in files], done)
    if heat is not None:
        await add_heatmaps(service, model, results, np.stack([d.image for d in done]),
                           np.stack([d.cal for d in done]), heat, request.scope)
    return JSONResponse(results)


def predict_results(model: Model, names: list[str], done: list[Prediction]) -> list[dict]:
    """`cxr14-predict --json`'s entry for each image, with `warnings` where decoding had some."""
    from cxr14.deployment.predict import image_result, rows_for

    results = [image_result(name, model.engine, rows_for(d.raw, d.cal, model.classes, model.thresholds), d.tags,
                            d.ood) for name, d in zip(names, done, strict=True)]
    for result, d in zip(results, done, strict=True):
        if d.notes:
            result["warnings"] = d.notes
    return results


async def add_heatmaps(service: Service, model: Model, results: list[dict], images: np.ndarray, cal: np.ndarray,
                       heat: str | list[str], scope: dict) -> None:
    """Each result's `heatmaps`: predict's engine draws them (`gradcam`) on the model thread, in turn with batches."""
    from cxr14.deployment.predict import heatmap_classes

    if heat == "all":
        chosen = [list(range(len(model.classes)))] * len(results)
    elif heat == "auto":
        chosen = [heatmap_classes(r["predictions"], cal[i]) for i, r in enumerate(results)]
    else:
        chosen = [[model.classes.index(n) for n in heat]] * len(results)
    assert service.batcher is not None
    start = time.perf_counter()
    maps = await service.batcher.in_model_thread(lambda: model.engine.gradcam(images, chosen))
    loop = asyncio.get_running_loop()
    for result, ks, ms in zip(results, chosen, maps, strict=True):
        pngs = await asyncio.gather(*(loop.run_in_executor(service.decoders, heatmap_png, m) for m in ms))
        result["heatmaps"] = {model.classes[k]: png for k, png in zip(ks, pngs, strict=True)}
    timing(scope, "heatmap_ms", time.perf_counter() - start)


def model_metadata(model: Model) -> dict:
    """OIP model metadata, with the classes, image size and whether heatmaps can be asked for as parameters."""
    size, width = model.engine.image_size, len(model.classes)
    return {"name": MODEL_NAME, "versions": [MODEL_VERSION],
            "platform": "onnxruntime_onnx" if model.engine.name == "onnx" else "pytorch_libtorch",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 1, size, size]},
                       {"name": "image_file", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": name, "datatype": kind, "shape": [-1, width]} for name, kind in OUTPUTS.items()],
            "parameters": {"classes": model.classes, "image_size": size, "thresholds": model.thresholds,
                           "calibration": model.calibrator["method"] if model.calibrator else "none",
                           "heatmaps": model.heatmaps, "model_file": str(model.engine.file)}}


def split_binary(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON part of an infer request and the binary tensor data after it (OIP's binary extension)."""
    cut = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise Fail(400, f"Inference-Header-Content-Length {header_length}: expected at most the body's "
                            f"{len(body)} bytes")
        cut = int(header_length)
    try:
        request = json.loads(body[:cut])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Fail(400, f"infer request: not JSON ({exc})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise Fail(400, "infer request: expected a JSON object with an 'inputs' list")
    return request, body[cut:]


def input_tensor(request: dict, blob: bytes, size: int) -> tuple[str, np.ndarray | list[bytes]]:
    """The one input of an infer request: 'image' as uint8 (n, S, S), or 'image_file' as n encoded files."""
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") not in ("image", "image_file"):
        raise Fail(400, "infer request: expected one input, 'image' (UINT8 [n, 1, S, S]) or 'image_file' "
                        "(BYTES [n])")
    spec = inputs[0]
    name, kind, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    want = "UINT8" if name == "image" else "BYTES"
    if kind != want or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Fail(400, f"input {name}: datatype {kind}, shape {shape}; expected {want} with a shape of integers")
    binary = (spec.get("parameters") or {}).get("binary_data_size")
    if binary is not None and (not isinstance(binary, int) or binary != len(blob)):
        raise Fail(400, f"input {name}: binary_data_size {binary}; the body holds {len(blob)} bytes after the JSON")
    if name == "image_file":
        files = bytes_elements(blob) if binary is not None else b64_elements(spec.get("data"))
        if len(shape) != 1 or shape[0] != len(files) or not files:
            raise Fail(400, f"input image_file: shape {shape} with {len(files)} elements; expected [n], n >= 1")
        return name, files
    if len(shape) != 4 or shape[1:] != [1, size, size] or shape[0] < 1:
        raise Fail(400, f"input image: shape {shape}; expected [n, 1, {size}, {size}], the model's input")
    try:
        data = (np.frombuffer(blob, dtype=np.uint8) if binary is not None
                else np.asarray(spec.get("data"), dtype=np.int64).ravel())
    except (TypeError, ValueError):
        raise Fail(400, "input image: data is not a list of integers") from None
    if data.size != int(np.prod(shape)) or (data.size and (data.min() < 0 or data.max() > 255)):
        raise Fail(400, f"input image: {data.size} values; expected {int(np.prod(shape))} integers in 0-255")
    return name, data.astype(np.uint8).reshape(shape[0], size, size)


def bytes_elements(blob: bytes) -> list[bytes]:
    """OIP's binary BYTES tensor: each element a 4-byte little-endian length and its bytes."""
    out, at = [], 0
    while at < len(blob):
        if at + 4 > len(blob):
            raise Fail(400, "input image_file: binary data ends inside an element's length")
        n = int.from_bytes(blob[at:at + 4], "little")
        if at + 4 + n > len(blob):
            raise Fail(400, "input image_file: an element's length runs past the binary data")
        out.append(blob[at + 4:at + 4 + n])
        at += 4 + n
    return out


def b64_elements(data: Any) -> list[bytes]:
    """BYTES elements in JSON: base64 strings (a file is not text)."""
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise Fail(400, "input image_file: expected 'data' as a list of base64 strings, or binary data")
    try:
        return [base64.b64decode(d, validate=True) for d in data]
    except ValueError:
        raise Fail(400, "input image_file: an element is not base64") from None


def infer_outputs(request: dict, model: Model, raw: np.ndarray, cal: np.ndarray) -> tuple[list[dict], list[bytes]]:
    """The outputs asked for (all three where none is named), in JSON or as binary data where asked."""
    decisions = np.array([[-1 if model.thresholds.get(c) is None else int(p >= model.thresholds[c])
                           for c, p in zip(model.classes, row, strict=True)] for row in cal], dtype=np.int8)
    values = {"probabilities": raw.astype(np.float32), "calibrated": cal.astype(np.float64), "decisions": decisions}
    asked = request.get("outputs") or [{"name": n} for n in OUTPUTS]
    every_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    outputs, blobs = [], []
    for spec in asked:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in OUTPUTS:
            raise Fail(400, f"output {name}: unknown; expected one of {', '.join(OUTPUTS)}")
        array = values[name]
        entry = {"name": name, "datatype": OUTPUTS[name], "shape": list(array.shape)}
        if (spec.get("parameters") or {}).get("binary_data", every_binary):
            blob = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    return outputs, blobs


async def infer(request: Any) -> Any:
    """POST /v2/models/cxr14[/versions/1]/infer: OIP inference, JSON or with binary tensor data."""
    from starlette.responses import JSONResponse, Response

    service: Service = request.app.state.service
    check_model(request)
    model = service.ready_model()
    kind = media_type(request)
    if kind and kind not in INFER_TYPES:
        raise Fail(415, f"Content-Type {kind}: expected {' or '.join(INFER_TYPES)} (OIP infer request)")
    body = await read_body(request, service.options.max_body_mb)
    req, blob = split_binary(body, request.headers.get("inference-header-content-length"))
    name, data = input_tensor(req, blob, model.engine.image_size)
    if name == "image_file":
        done = await asyncio.gather(*(service.predict_file(d, f"image_file[{i}]", request.scope)
                                      for i, d in enumerate(data)))
        raw, cal = np.stack([d.raw for d in done]), np.stack([d.cal for d in done])
    else:
        raw, cal, _ = await service.forward(np.asarray(data), request.scope)
    outputs, blobs = infer_outputs(req, model, raw, cal)
    answer = {"model_name": MODEL_NAME, "model_version": MODEL_VERSION, "outputs": outputs}
    if "id" in req:
        answer["id"] = req["id"]
    if not blobs:
        return JSONResponse(answer)
    head = json.dumps(answer).encode()
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def check_model(request: Any) -> None:
    name, version = request.path_params["name"], request.path_params.get("version", MODEL_VERSION)
    if name != MODEL_NAME or version != MODEL_VERSION:
        raise Fail(404, f"model {name} version {version}: not served; this server serves {MODEL_NAME} version "
                        f"{MODEL_VERSION}")


def routes() -> list:
    """The OIP v2 REST endpoints, the upload endpoint and the page."""
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    def service_of(request: Any) -> Service:
        return request.app.state.service

    async def live(request: Any) -> Any:
        return JSONResponse({"live": True})

    async def ready(request: Any) -> Any:
        up = service_of(request).model is not None
        return JSONResponse({"ready": up}, status_code=200 if up else 503)

    async def server_metadata(request: Any) -> Any:
        from cxr14 import __version__

        return JSONResponse({"name": "cxr14-serve", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_ready(request: Any) -> Any:
        check_model(request)
        up = service_of(request).model is not None
        return JSONResponse({"name": MODEL_NAME, "ready": up}, status_code=200 if up else 503)

    async def metadata(request: Any) -> Any:
        check_model(request)
        return JSONResponse(model_metadata(service_of(request).ready_model()))

    async def page(request: Any) -> Any:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    async def favicon(request: Any) -> Any:
        return Response(status_code=204)

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    return [Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_metadata),
            *(Route(base, metadata) for base in (model, versioned)),
            *(Route(f"{base}/ready", model_ready) for base in (model, versioned)),
            *(Route(f"{base}/infer", infer, methods=["POST"]) for base in (model, versioned)),
            Route("/predict", upload, methods=["POST"]), Route("/", page), Route("/favicon.ico", favicon)]


def create_app(options: Options, model: Model | None = None, token: str | None = None,
               loader: Callable[[Options], Model] = load) -> Any:
    """The ASGI application: `model` already loaded (one process), or loaded by `loader` during the lifespan's
    start-up (each worker of `--workers N`, which accepts connections only then). `token`: required on every
    request when given."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException

    service = Service(options, model, loader)

    async def refused(request: Any, exc: Exception) -> Any:
        return error_response(exc.status, str(exc))  # type: ignore[attr-defined]

    async def http_error(request: Any, exc: Any) -> Any:
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def crashed(request: Any, exc: Exception) -> Any:
        log.error("internal error: %s", type(exc).__name__)  # the message may quote the input: not logged
        return error_response(500, f"internal error ({type(exc).__name__})")

    app = Starlette(routes=routes(), lifespan=service.lifespan,
                    exception_handlers={Fail: refused, HTTPException: http_error, PipelineError: crashed,
                                        Exception: crashed})
    app.state.service = service
    return Guard(app, service, token)


def worker_app() -> Any:
    """`--workers N`: each uvicorn worker process builds its app from the options the command put in the
    environment, and loads the model itself."""
    options = Options(**json.loads(os.environ[OPTIONS_ENV]))
    return create_app(options, token=os.environ.get(TOKEN_ENV) or None)


def setup_logging(level: str = "info") -> None:
    """One line per request on stderr (uvicorn's access log, which prints the query string, stays off)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def serve(options: Options, host: str, port: int, workers: int, log_level: str = "info") -> None:
    """Check the model (a foreign or stale file stops here, in one line), then serve until SIGTERM or Ctrl-C:
    uvicorn then stops listening, answers every request it accepted, and exits."""
    import uvicorn

    model = load(options)
    token = os.environ.get(TOKEN_ENV) or None
    setup_logging(log_level)
    log.info("model %s (%s engine, %d classes, %d px, heatmaps %s); http://%s:%d/ with %d worker(s); API token %s",
             model.engine.file, model.engine.name, len(model.classes), model.engine.image_size,
             "yes" if model.heatmaps else "no", host, port, workers, "required" if token else "off")
    # uvicorn handles SIGTERM and Ctrl-C while it serves (drain, then exit), then raises the signal again for the
    # handler it found: ignored, so that a drained stop is a clean exit (0), not run_main's "terminated" (143)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    common = {"host": host, "port": port, "log_level": log_level, "access_log": False, "timeout_keep_alive": 30}
    if workers > 1:
        del model  # each worker loads its own
        os.environ[OPTIONS_ENV] = json.dumps(asdict(options))
        uvicorn.run("cxr14.deployment.serve:worker_app", factory=True, workers=workers, **common)
        return
    uvicorn.run(create_app(options, model, token), **common)


if __name__ == "__main__":
    from cxr14.cli import serve_main

    serve_main()
