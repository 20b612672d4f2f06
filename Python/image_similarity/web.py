"""The web service: a REST API over the engine (rank an uploaded image, serve catalogue images, model facts)
and a plain page to try it, all loaded once and shared by every request."""
from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from importlib.resources import files
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, HTTPException, Path, Query, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .images import BadImageError
from .rank import METHODS, Catalogue, default_method, latest_model, rank
from .store import Store, StoreError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
FORM_OVERHEAD = 64 * 1024
"""Room for multipart framing on top of the image itself."""
ACCEPTED_TYPES = ("image/", "application/octet-stream")
MAX_ID = 2 ** 63 - 1
PAGE_CSP = "default-src 'self'; img-src 'self' blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


class MatchOut(BaseModel):
    rank: int
    id: int
    name: str
    label: str
    score: float
    url: str


class RankOut(BaseModel):
    query: str
    method: str
    backbone: str
    model_version: int | None
    matches: list[MatchOut]


class HealthOut(BaseModel):
    status: str
    version: str
    images: int
    max_upload_bytes: int


class ModelOut(BaseModel):
    version: int | None
    backbone: str
    classes: list[str]
    method: str
    methods: list[str]
    catalogue_size: int
    params: dict[str, Any]
    evaluation: dict[str, Any] | None


class SerialFeaturizer:
    """A featurizer shared by request threads: one forward pass at a time, so concurrent requests do not
    oversubscribe the CPU or interleave on one device."""

    def __init__(self, featurizer) -> None:
        self.inner = featurizer
        self.lock = threading.Lock()

    @property
    def backbone(self) -> str:
        return self.inner.backbone

    def features(self, images: Sequence[Image.Image]):
        with self.lock:
            return self.inner.features(images)


class UploadLimit:
    """ASGI middleware: a request body over `limit` bytes, declared or streamed, is answered 413 with a JSON
    error before it is read further."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_large(self.limit)(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, too_large_reason(self.limit))
            return message

        await self.app(scope, counted, send)


def too_large_reason(limit: int) -> str:
    return f"upload too large: the limit is {limit / 2 ** 20:.0f} MB"


def too_large(limit: int) -> Response:
    return JSONResponse({"detail": too_large_reason(limit)}, status_code=413)


def content_type(data: bytes) -> str:
    """The MIME type of stored image bytes, from the format they hold (MPO is served as the JPEG it is)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = "JPEG" if image.format == "MPO" else image.format
    except OSError:  # not expected for stored images, which were validated when ingested
        return "application/octet-stream"
    return Image.MIME.get(fmt or "", "application/octet-stream")


def create_app(store: Store, featurizer, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The service on an open store: the latest model, its catalogue and default method are loaded now, once.

    `featurizer` must use the model's backbone (or any backbone with features in the store when there is no
    model). The store is only read, under a lock, so one connection serves every request thread.
    """
    model = latest_model(store)
    if model and model.backbone != featurizer.backbone:
        raise ValueError(f"the model uses {model.backbone} features but the featurizer is {featurizer.backbone}")
    catalogue = Catalogue.from_store(store, featurizer.backbone, model)
    evaluation = store.evaluation(model.version) if model else None
    info = ModelOut(
        version=model.version if model else None, backbone=featurizer.backbone,
        classes=model.classes if model else sorted(set(catalogue.labels.tolist())),
        method=default_method(store, model),
        methods=[m for m in METHODS if model or m in ("l2", "cosine")], catalogue_size=len(catalogue),
        params=model.params if model else {},
        evaluation={k: v for k, v in evaluation.summary.items() if k != "plots"} if evaluation else None,
    )
    shared = SerialFeaturizer(featurizer)
    store_lock = threading.Lock()
    page = files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")

    app = FastAPI(title="image-similarity", version=__version__,
                  description="Upload an image; get the most similar catalogue images back.")
    app.add_middleware(UploadLimit, limit=max_upload_bytes + FORM_OVERHEAD)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @app.post("/api/rank", response_model=RankOut, summary="The catalogue images most similar to an uploaded image",
              responses={400: {"description": "not an image"}, 413: {"description": "upload too large"}})
    def rank_upload(file: Annotated[UploadFile, File(description="the query image (JPEG, PNG, ...)")],
                    top: Annotated[int, Query(ge=1, le=100, description="how many images")] = 10,
                    method: Annotated[Literal[METHODS] | None,
                                      Query(description="similarity (default: the best evaluated)")] = None,
                    ) -> RankOut:
        declared = (file.content_type or "application/octet-stream").lower()
        if not declared.startswith(ACCEPTED_TYPES):
            raise HTTPException(400, f"not an image: uploaded as {declared}")
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, too_large_reason(max_upload_bytes))
        name = file.filename or "upload"
        try:
            result = rank(store, data, shared, top=top, method=method or info.method, catalogue=catalogue,
                          name=name, save=False)
        except (BadImageError, StoreError) as err:
            raise HTTPException(400, str(err)) from None
        return RankOut(query=name, method=result.method, backbone=result.backbone,
                       model_version=result.model_version,
                       matches=[MatchOut(rank=m.rank, id=m.image_id, name=m.name, label=m.label, score=m.score,
                                         url=f"/api/images/{m.image_id}") for m in result.matches])

    @app.get("/api/images/{image_id}", summary="A catalogue image, as stored",
             response_class=Response,
             responses={200: {"content": {"image/*": {}}}, 404: {"description": "no such image"}})
    def image(image_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> Response:
        try:
            with store_lock:
                data = store.image_bytes(image_id)
        except StoreError:
            raise HTTPException(404, f"no image with id {image_id}") from None
        return Response(data, media_type=content_type(data),
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.get("/api/images/{image_id}/neighbors", response_model=RankOut,
             summary="The stored most similar catalogue images of a catalogue image (image-similarity neighbors)",
             responses={404: {"description": "no neighbours stored for this image and method"}})
    def neighbors(image_id: Annotated[int, Path(ge=1, le=MAX_ID)],
                  method: Annotated[Literal[METHODS] | None,
                                    Query(description="similarity (default: the service's)")] = None) -> RankOut:
        method = method or info.method
        version = model.version if model and method in ("scores", "learned") else 0
        with store_lock:
            rows = store.neighbors(image_id, featurizer.backbone, method, version)
        if not rows:
            raise HTTPException(404, f"no {method} neighbours stored for image {image_id}: "
                                     "run 'image-similarity neighbors'")
        return RankOut(query=f"image {image_id}", method=method, backbone=featurizer.backbone,
                       model_version=version or None,
                       matches=[MatchOut(rank=r, id=i, name=name, label=label, score=s, url=f"/api/images/{i}")
                                for r, i, name, label, s in rows])

    @app.get("/api/health", response_model=HealthOut, summary="Whether the service is up")
    def health() -> HealthOut:
        return HealthOut(status="ok", version=__version__, images=len(catalogue), max_upload_bytes=max_upload_bytes)

    @app.get("/api/model", response_model=ModelOut, summary="The model in use and its evaluation figures")
    def model_info() -> ModelOut:
        return info

    return app

