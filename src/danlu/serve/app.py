"""`danlu serve`: a trained run behind a web page and a JSON API.

    from danlu.serve import create_app, serve
    app = create_app("runs/lenet", max_batch=64, max_wait_ms=5)      # a FastAPI app (ASGI)
    serve("runs/lenet", host="127.0.0.1", port=8000)                 # the same app on uvicorn, until Ctrl-C

Endpoints: `GET /` the page, `POST /v1/classify`, `GET /v1/model`, `GET /healthz`, OpenAPI docs at `/docs`; for a face
run also `POST /v1/faces/embed|verify|identify` (otherwise those answer 404 "not a face model").

Uploads are decoded exactly as the run's training data was (danlu.data.decode: Pillow, the run's channels, resized to
its input size by `data.resize`) and go through the run's own preprocessing and precision (danlu.predict.forward),
micro-batched with other requests' images (danlu.serve.batcher). Uploads stay in memory (the body is refused past
`max_upload_mb`, by its Content-Length before it is read and while it streams), images are refused past `max_pixels`
before their pixels are decoded, and the server fetches nothing a client names. Every refusal is a 4xx JSON
`{"error": "..."}` naming the problem.
"""
from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from danlu.errors import DanluError
from danlu.serve.batcher import MicroBatcher
from danlu.serve.faces import FaceService, face_service

STATIC = Path(__file__).parent / "static"
MAX_PIXELS = 40_000_000  # 40 megapixels (e.g. 7300 x 5500): a larger upload is refused before it is decoded
MAX_IMAGES = 64  # image files in one request
# Ctrl-C / SIGTERM: requests still running get this long to finish, then are cancelled. uvicorn waits for them for
# ever by default (it was 5 s here): a browser's half-sent upload held the stop that long.
SHUTDOWN_GRACE_S = 0.5


class Refused(Exception):
    """A request the server will not serve: answered `status` with {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _InMemoryParser(MultiPartParser):
    """Starlette's multipart parser, but file parts never roll over to a temporary file on disk: the whole body is
    at most `in_memory` bytes anyway."""

    def __init__(self, *args: Any, in_memory: int, **kw: Any):
        super().__init__(*args, **kw)
        self.spool_max_size = in_memory + 1


def _upload_schema(fields: dict[str, str]) -> dict:
    """OpenAPI for a multipart body of file fields ({name: description}), so /docs offers the upload."""
    props = {name: ({"type": "array", "items": {"type": "string", "format": "binary"}, "description": about}
                    if name == "file" else {"type": "string", "format": "binary", "description": about})
             for name, about in fields.items()}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": list(fields), "properties": props}}}}}


def create_app(run: Any, *, gallery: Union[str, Path, None] = None, faces: Optional[FaceService] = None,
               device: Optional[str] = None, max_batch: int = 64, max_wait_ms: float = 5.0,
               max_upload_mb: float = 10.0, max_pixels: int = MAX_PIXELS, max_images: int = MAX_IMAGES) -> FastAPI:
    """The app for `run` (a run folder or a danlu.runs.LoadedRun). `faces`: the run's FaceService (default: the one
    danlu.face provides for a face run, with `gallery`); None and not a face run: the face endpoints answer 404."""
    from danlu.predict import forward
    from danlu.runs import LoadedRun, device_name, load_run, version

    if max_upload_mb <= 0:
        raise DanluError(f"--max-upload-mb {max_upload_mb}: expected a positive number of MiB")
    if max_pixels < 1:
        raise DanluError(f"--max-pixels {max_pixels}: expected a positive number of pixels")
    if max_images < 1:
        raise DanluError(f"max_images={max_images}: expected at least 1")
    loaded: LoadedRun = run if isinstance(run, LoadedRun) else load_run(run, device=device or "auto")
    if faces is None:
        faces = face_service(loaded, gallery)
    batchers = {"classify": MicroBatcher(lambda x: forward(loaded, x), max_batch=max_batch, max_wait_ms=max_wait_ms)}
    if faces is not None:
        batchers["faces"] = MicroBatcher(faces.embed, max_batch=max_batch, max_wait_ms=max_wait_ms)
    app = FastAPI(title="danlu serve", version=version(), lifespan=_lifespan(loaded, faces, batchers, max_pixels),
                  description=f"{loaded.recipe.model.name} from {loaded.run_dir}: classify images"
                              + (", embed, verify and identify faces" if faces is not None else ""))
    app.state.run, app.state.faces, app.state.batchers = loaded, faces, batchers
    app.state.precision = loaded.precision.name
    _add_error_handlers(app)
    up = _Uploads(loaded, faces, max_upload_mb, max_pixels, max_images)
    info = _model_info(loaded, faces, device_name(loaded.device), app.state.precision, max_batch=max_batch,
                       max_wait_ms=max_wait_ms, max_upload_mb=max_upload_mb, max_pixels=max_pixels,
                       max_images=max_images)  # fixed for the server's life: built once
    _add_page_and_classify(app, loaded, faces, batchers["classify"], up, info)
    if faces is None:
        _add_not_faces(app, loaded)
    else:
        _add_faces(app, faces, batchers["faces"], up)
    return app


def _lifespan(loaded: Any, faces: Optional[FaceService], batchers: dict[str, MicroBatcher], max_pixels: int):
    """Start the batchers and warm everything up (Pillow's plugins, first-call allocations, lazy inits) before the
    first request, so the first user's timings are honest ones; stop the batchers at shutdown."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for b in batchers.values():
            await b.start()
        await asyncio.to_thread(_decode_all, [("warm-up", _tiny_png())], loaded.shape, loaded.recipe.data.resize,
                                max_pixels)
        await batchers["classify"].submit(torch.zeros((1, *loaded.shape), dtype=torch.uint8))
        if faces is not None:
            await batchers["faces"].submit(torch.zeros((1, *faces.shape), dtype=torch.uint8))
        yield
        for b in batchers.values():
            await b.stop()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal as a 4xx JSON {"error": "..."} that names the problem."""
    @app.exception_handler(Refused)
    async def _refused(request: Request, e: Refused) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        what = {404: f"no such endpoint: {request.method} {request.url.path}; see /docs",
                405: f"{request.method} is not allowed on {request.url.path}; see /docs"}.get(e.status_code, e.detail)
        return JSONResponse({"error": what}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{' '.join(str(x) for x in err.get('loc', ()))}: {err.get('msg', 'invalid')} "
                 f"(got {err.get('input')!r})" for err in e.errors()]
        return JSONResponse({"error": "; ".join(parts)}, status_code=422)


class _Uploads:
    """A request's image uploads: the multipart body in memory within the limits, the file fields checked, the
    images decoded (or their faces cut) in a worker thread as the run's training images were."""

    def __init__(self, loaded: Any, faces: Optional[FaceService], max_upload_mb: float, max_pixels: int,
                 max_images: int):
        self.loaded, self.faces, self.mb = loaded, faces, max_upload_mb
        self.limit, self.max_pixels, self.max_images = int(max_upload_mb * 1024 * 1024), max_pixels, max_images

    async def form(self, request: Request, names: tuple[str, ...]) -> FormData:
        """The multipart body, in memory, refused (413) past the upload limit before or while it is read."""
        from starlette.formparsers import parse_options_header

        ctype = request.headers.get("content-type", "")
        if parse_options_header(ctype)[0] != b"multipart/form-data":
            raise Refused(415, f"content type {ctype or '(none)'!r}: expected multipart/form-data with the image "
                               f"file(s) in field(s) {', '.join(repr(n) for n in names)}")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            raise Refused(413, f"upload of {int(length) / 2**20:.3g} MiB is over the limit of {self.mb:g} MiB "
                               f"(--max-upload-mb)")

        async def capped() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > self.limit:
                    raise Refused(413, f"upload over the limit of {self.mb:g} MiB (--max-upload-mb)")
                yield chunk

        parser = _InMemoryParser(request.headers, capped(), max_files=self.max_images, max_fields=16,
                                 in_memory=self.limit)
        try:
            return await parser.parse()
        except MultiPartException as e:
            raise Refused(400, f"malformed multipart body ({e.message}); expected image file(s) in field(s) "
                               f"{', '.join(repr(n) for n in names)}") from None
        except ClientDisconnect:
            raise Refused(400, "the client closed the connection before the upload was complete") from None

    @staticmethod
    def files(form: FormData, name: str, one: bool = False) -> list[UploadFile]:
        """The upload(s) in field `name`: present, files (not text), image content types."""
        items = form.getlist(name)
        if not items:
            got = sorted(set(form.keys()))
            raise Refused(422, f"missing field {name!r}" + (f" (got {', '.join(map(repr, got))})" if got else "")
                               + f"; expected {'an image file' if one else 'one or more image files'} in field "
                                 f"{name!r}")
        if one and len(items) > 1:
            raise Refused(422, f"field {name!r} holds {len(items)} files; expected one image file")
        for it in items:
            if not isinstance(it, UploadFile):
                raise Refused(422, f"field {name!r} is text, not a file upload; expected an image file")
            ctype = (it.content_type or "").split(";")[0].strip().lower()
            if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
                raise Refused(415, f"file {it.filename or name!r}: content type {ctype!r}; expected an image "
                                   f"(image/*)")
        return items

    async def decode(self, uploads: list[UploadFile]) -> tuple[torch.Tensor, float]:
        """uploads -> uint8 (N, C, H, W) decoded as training decodes files, and the ms it took."""
        blobs = [(u.filename or "upload", await u.read()) for u in uploads]
        return await asyncio.to_thread(_decode_all, blobs, self.loaded.shape, self.loaded.recipe.data.resize,
                                       self.max_pixels)

    async def face_crops(self, uploads: list[UploadFile]) -> tuple[torch.Tensor, float]:
        """uploads -> uint8 (N, C, H, W) face crops, cut as the run's training faces were, and the ms it took."""
        blobs = [(u.filename or "upload", await u.read()) for u in uploads]
        return await asyncio.to_thread(_face_crops, self.faces, blobs, self.max_pixels)


def _timings(t_start: float, decode_ms: float, b: Any) -> dict[str, float]:
    return {"decode": round(decode_ms, 3), "queue": round(b.queue_ms, 3), "model": round(b.model_ms, 3),
            "total": round(1000 * (time.perf_counter() - t_start), 3)}


def _add_page_and_classify(app: FastAPI, loaded: Any, faces: Optional[FaceService], batcher: MicroBatcher,
                           up: _Uploads, info: dict) -> None:
    """GET / (the page), /static, /healthz, /v1/model and POST /v1/classify."""
    from danlu.models import is_face_model

    face_model = faces is not None and is_face_model(loaded.model)  # classify cuts faces as training did

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", summary="liveness: 200 while the server serves")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model", summary="the served model: classes, recipe summary, device, precision, limits")
    async def model_info() -> dict:
        return info

    @app.post("/v1/classify", summary="top-k classes of one or more uploaded images",
              openapi_extra=_upload_schema({"file": "image file(s); repeat the field for several"}))
    async def classify(request: Request, top: int = Query(5, ge=1, le=1000, description="classes per image")) -> dict:
        t0 = time.perf_counter()
        if not loaded.classes:  # an imported face network: embeddings, no identity head
            raise Refused(409, f"this run has no classes to classify into ({loaded.recipe.model.name} from "
                               f"{loaded.run_dir} embeds faces); use /v1/faces/embed, /v1/faces/verify or "
                               f"/v1/faces/identify")
        uploads = up.files(await up.form(request, ("file",)), "file")
        # (N, C, H, W) uint8; a face run classifies identities from face crops, cut as its training faces were
        x, decode_ms = await (up.face_crops(uploads) if face_model else up.decode(uploads))
        b = await batcher.submit(x)
        values, index = b.rows.topk(min(top, len(loaded.classes)), dim=1)  # (N, k)
        images = [{"file": u.filename, "top": [{"class": loaded.classes[c], "prob": round(p, 6)} for c, p in zip(j, v)]}
                  for u, v, j in zip(uploads, values.tolist(), index.tolist())]
        return {"images": images, "timings_ms": _timings(t0, decode_ms, b), "batch_images": b.batch_images}


def _add_not_faces(app: FastAPI, loaded: Any) -> None:
    @app.api_route("/v1/faces/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def not_faces(rest: str) -> None:
        raise Refused(404, f"this run is not a face model ({loaded.recipe.model.name} from {loaded.run_dir}): "
                           f"/v1/faces/{rest} needs a face run")


def _add_faces(app: FastAPI, faces: FaceService, batcher: MicroBatcher, up: _Uploads) -> None:
    """POST /v1/faces/embed, /v1/faces/verify and /v1/faces/identify."""

    @app.post("/v1/faces/embed", summary="face embeddings (unit length) of one or more uploaded face images",
              openapi_extra=_upload_schema({"file": "face image file(s); repeat the field for several"}))
    async def faces_embed(request: Request) -> dict:
        t0 = time.perf_counter()
        uploads = up.files(await up.form(request, ("file",)), "file")
        x, decode_ms = await up.face_crops(uploads)
        b = await batcher.submit(x)  # rows: (N, D)
        return {"images": [{"file": u.filename, "embedding": [round(v, 6) for v in e]}
                           for u, e in zip(uploads, b.rows.tolist())],
                "dim": int(b.rows.shape[1]), "timings_ms": _timings(t0, decode_ms, b), "batch_images": b.batch_images}

    @app.post("/v1/faces/verify", summary="are two face images the same person? (the run's threshold)",
              openapi_extra=_upload_schema({"a": "the first face image", "b": "the second face image"}))
    async def faces_verify(request: Request) -> dict:
        t0 = time.perf_counter()
        form = await up.form(request, ("a", "b"))
        uploads = up.files(form, "a", one=True) + up.files(form, "b", one=True)
        x, decode_ms = await up.face_crops(uploads)
        b = await batcher.submit(x)  # rows: (2, D)
        similarity = float(b.rows[0] @ b.rows[1])  # cosine: the rows are unit vectors
        return {"similarity": round(similarity, 6), "same": similarity >= faces.threshold,
                "threshold": faces.threshold, "files": [u.filename for u in uploads],
                "timings_ms": _timings(t0, decode_ms, b)}

    @app.post("/v1/faces/identify", summary="the gallery's nearest names for one or more face images",
              openapi_extra=_upload_schema({"file": "face image file(s); repeat the field for several"}))
    async def faces_identify(request: Request, top: int = Query(5, ge=1, le=100, description="names per face")) \
            -> dict:
        t0 = time.perf_counter()
        if not faces.has_gallery:
            raise Refused(409, "no gallery to identify against; start danlu serve with --gallery G.sqlite")
        uploads = up.files(await up.form(request, ("file",)), "file")
        x, decode_ms = await up.face_crops(uploads)
        b = await batcher.submit(x)
        found = await asyncio.to_thread(faces.identify, b.rows, top)
        images = []
        for u, matches in zip(uploads, found):
            best = matches[0] if matches else None
            images.append({"file": u.filename,
                           "name": best[0] if best and best[1] >= faces.threshold else "unknown",
                           "matches": [{"name": n, "similarity": round(float(s), 6)} for n, s in matches]})
        return {"images": images, "threshold": faces.threshold, "timings_ms": _timings(t0, decode_ms, b)}


def _decode_all(blobs: list[tuple[str, bytes]], shape: tuple[int, int, int], resize: str,
                max_pixels: int) -> tuple[torch.Tensor, float]:
    from danlu.data.decode import BadImage, decode_image

    t0 = time.perf_counter()
    c, h, w = shape
    out = torch.empty((len(blobs), c, h, w), dtype=torch.uint8)  # (N, C, H, W)
    for i, (name, data) in enumerate(blobs):
        if not data:
            raise Refused(400, f"file {name!r}: empty file (0 bytes); expected an image")
        try:
            with warnings.catch_warnings():  # Pillow's notes (EXIF, palettes, its own bomb warning) are not news
                warnings.filterwarnings("ignore", module=r"PIL\.")
                out[i].numpy()[...] = decode_image(io.BytesIO(data), (h, w), c, resize, max_pixels=max_pixels)
        except BadImage as e:
            raise Refused(400, f"file {name!r}: {e}") from None
    return out, 1000 * (time.perf_counter() - t0)


def _face_crops(faces: FaceService, blobs: list[tuple[str, bytes]], max_pixels: int) -> tuple[torch.Tensor, float]:
    from PIL import Image

    t0 = time.perf_counter()
    for name, data in blobs:  # what decode_image checks for classifiers, before the face module reads the pixels
        if not data:
            raise Refused(400, f"file {name!r}: empty file (0 bytes); expected an image")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", module=r"PIL\.")
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for untrusted input
            raise Refused(400, f"file {name!r}: not a readable image ({type(e).__name__})") from None
        if w * h > max_pixels:
            raise Refused(400, f"file {name!r}: image of {w}x{h} pixels is over the limit of {max_pixels} pixels "
                               f"(a decompression bomb?); expected a smaller image")
    try:
        x = faces.crops([data for _, data in blobs])  # (N, C, H, W) uint8
    except DanluError as e:  # 'image 2: not a readable image (...)': name the upload instead
        message, which = str(e), re.match(r"image (\d+): ", str(e))
        if which and 1 <= int(which.group(1)) <= len(blobs):
            message = f"file {blobs[int(which.group(1)) - 1][0]!r}: {message[which.end():]}"
        raise Refused(400, message) from None
    return x, 1000 * (time.perf_counter() - t0)


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    return buf.getvalue()


def _model_info(run, faces: Optional[FaceService], device: str, precision: str, **limits: Any) -> dict:
    import json

    r, d = run.recipe, run.recipe.data
    summary_path = Path(run.run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"model": r.model.name, "run_dir": str(run.run_dir), "weights": Path(run.weights).name,
            "classes": list(run.classes), "input_shape": list(run.shape), "device": device, "precision": precision,
            "recipe": {"data": d.name, "size": list(run.shape[1:]), "channels": run.shape[0], "resize": d.resize,
                       "normalize": d.normalize, "precision": r.precision, "optim": r.optim.name,
                       "iterations": summary.get("iterations"), "test_accuracy": summary.get("test_accuracy")},
            "face": faces is not None,
            "faces": None if faces is None else {"threshold": faces.threshold, "gallery": faces.has_gallery,
                                                 "input_shape": list(faces.shape)},
            "limits": limits}




def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) means this machine only."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def serve(run: Any, *, host: str = "127.0.0.1", port: int = 8000, access_log: bool = False,
          say=print, **app_kw: Any) -> None:
    """Load the run, bind host:port (127.0.0.1: this machine only unless `host` says otherwise; port 0: any free
    one) and serve until interrupted. Errors (run, port taken, bad host) are DanluError before anything is served.
    Ctrl-C / SIGTERM: requests in flight get SHUTDOWN_GRACE_S to finish, then `say` gets one line (the stop, and how
    many were in flight) and serve returns."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise DanluError(f"--port {port}: expected 0..65535 (0: any free port)")
    app = create_app(run, **app_kw)  # load the run first: a bad run is reported before the port is taken
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    where = f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
    r = app.state.run
    gallery = " + gallery" if app.state.faces is not None and app.state.faces.has_gallery else ""
    batching = f"max batch {app_kw.get('max_batch', 64)}, wait {app_kw.get('max_wait_ms', 5.0):g} ms"
    if not r.classes:  # an imported face network: embeddings only
        what = f"face embeddings{gallery}"
    else:
        what = f"{len(r.classes)} classes" + (f", faces{gallery}" if app.state.faces is not None else "")
    say(f"danlu serve: {r.recipe.model.name} from {r.run_dir} ({what}) on {r.device}, "
        f"{app.state.precision}; {batching}")
    if not is_loopback(host):
        say(f"danlu serve: warning: listening on {host}, reachable from other machines; there is no "
            f"authentication")
    config = uvicorn.Config(app, host=host, port=bound, log_level="info" if access_log else "warning",
                            access_log=access_log, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    stop: dict[str, Any] = {"signal": None, "in_flight": 0}
    uvicorn_log = logging.getLogger("uvicorn.error")
    level = uvicorn_log.level

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)  # the run is warm and the socket accepts: now say where
            if not self.should_exit:
                say(f"danlu serve: {where}  (page {where}/, API docs {where}/docs; Ctrl-C stops)")

        def handle_exit(self, sig: int, frame: Any) -> None:
            stop["signal"] = stop["signal"] or sig
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            stop["in_flight"] = len(self.server_state.tasks)  # requests still running when the stop came
            # those still running after the grace are cancelled: the stop line counts them, not a traceback each
            uvicorn_log.setLevel(logging.CRITICAL)
            await super().shutdown(sockets)

    # uvicorn stops on SIGINT / SIGTERM, then raises the signal again for the handler it found: SIGINT's raises
    # KeyboardInterrupt; SIGTERM's default would kill the process before the stop line, so it raises _Stopped here
    main = threading.current_thread() is threading.main_thread()
    term = signal.signal(signal.SIGTERM, _raise_stopped) if main else None
    try:
        _Server(config).run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped) as e:
        stop["signal"] = stop["signal"] or (signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
    finally:
        uvicorn_log.setLevel(level)
        if main:
            signal.signal(signal.SIGTERM, term)
    if stop["signal"] is not None:
        why = "Ctrl-C" if stop["signal"] == signal.SIGINT else signal.Signals(stop["signal"]).name
        n = stop["in_flight"]
        say(f"danlu serve: stopped ({why})" + (f"; {n} request(s) in flight had {SHUTDOWN_GRACE_S:g} s to finish"
                                               if n else ""))


class _Stopped(Exception):
    """SIGTERM, raised again by uvicorn once it has stopped (see serve)."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise DanluError(f"--host {host}: not an address of this machine ({e.strerror}); expected e.g. 127.0.0.1 "
                         f"or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise DanluError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); expected a free "
                         f"port (--port 0 picks one) on an address of this machine") from None
    sock.set_inheritable(True)
    return sock
