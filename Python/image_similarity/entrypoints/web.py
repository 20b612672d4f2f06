"""The web service: a REST API over the engine (rank an uploaded image, serve catalogue images, model facts,
add and remove catalogue images with the operator's key) and a plain page to try it. Answers come from an
immutable snapshot of the model and catalogue that is reloaded whole when the database changes (service.py)."""
from __future__ import annotations

import hashlib
import hmac
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Path, Query, Request, Security, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel
from pydantic import Field as PydanticField
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import BadInput, ImageSimilarityError, NotFound, NotReady, Unavailable
from ..pipeline.audit import CUTOFF
from ..pipeline.ingest import ingest_one
from ..pipeline.rank import rank_with
from ..pipeline.suggest import with_suggestions
from ..search.methods import METHODS, ranking_method
from ..search.searchers import Match
from ..store import Store
from .service import Service, Snapshot

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
FORM_OVERHEAD = 64 * 1024
"""Room for multipart framing on top of the image itself."""
ACCEPTED_TYPES = ("image/", "application/octet-stream")
MAX_ID = 2 ** 63 - 1
API_KEY_ENV = "IMAGE_SIMILARITY_API_KEY"
BEARER = HTTPBearer(auto_error=False, description="the operator's API key")
MAX_LABEL, MAX_NAME, MAX_KEY, MAX_METADATA = 100, 300, 400, 64 * 1024
LABEL_PATTERN = r"^[^/\\\x00-\x1f\x7f]+$"
"""A class name: no slashes or control characters (labels are folder names to ingest)."""
STATUS_OF_KIND: tuple[tuple[type[ImageSimilarityError], int], ...] = (
    (NotFound, 404), (BadInput, 400), (NotReady, 409), (Unavailable, 503))
"""The HTTP status of each kind of error (the first that matches; FastAPI's own validation answers 422). Any
other exception is a bug: 500, with its traceback in the server's log."""
PAGE_CSP = "default-src 'self'; img-src 'self' blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


class MatchOut(BaseModel):
    rank: int
    id: int
    name: str
    label: str | None
    """None: unlabelled (then `suggested` and `probability` are the latest model's guess)."""
    score: float
    url: str
    key: str | None = None
    """The item's key and metadata, as ingested."""
    metadata: dict[str, Any] | None = None
    suggested: str | None = None
    probability: float | None = None


class RankOut(BaseModel):
    query: str
    method: str
    backbone: str
    model_version: int | None
    catalogue_size: int
    """How many catalogue images the answer was ranked among."""
    matches: list[MatchOut]
    suggested: str | None = None
    """The label the model suggests for the query, and its probability (none without a model)."""
    probability: float | None = None


class HealthOut(BaseModel):
    status: str
    version: str
    images: int
    max_upload_bytes: int


class AddedOut(BaseModel):
    id: int
    name: str
    label: str | None
    url: str
    featurized_in_background: bool
    key: str | None = None


class RemovedOut(BaseModel):
    id: int
    catalogue_size: int


class LabelIn(BaseModel):
    label: Annotated[str, PydanticField(min_length=1, max_length=MAX_LABEL, pattern=LABEL_PATTERN)]
    new_class: bool = False
    """Allow a label that no stored image has yet."""


class LabelOut(BaseModel):
    id: int
    label: str
    previous: str | None


class TwinOut(BaseModel):
    id: int
    name: str
    label: str


class SuspectOut(TwinOut):
    suggested: str
    probability: float
    label_probability: float
    reasons: list[str]
    twins: list[TwinOut]
    url: str


class AuditOut(BaseModel):
    backbone: str
    images: int
    classes: dict[str, int]
    cutoff: float
    folds: int
    C: float
    suspects: list[SuspectOut]
    """The likeliest label mistakes first (at most `top` of them)."""
    total_suspects: int
    small_classes: dict[str, int]
    conflicts: list[list[TwinOut]]
    unlabelled: int = 0
    """Featurized images without a label, not judged."""


class CatalogueOut(BaseModel):
    backbone: str
    images: int
    featurized: int
    waiting: int
    featurizing: bool
    served: int
    model_version: int | None
    reload_error: str | None
    featurize_error: str | None


class ModelOut(BaseModel):
    version: int | None
    backbone: str
    classes: list[str]
    method: str
    methods: list[str]
    catalogue_size: int
    params: dict[str, Any]
    evaluation: dict[str, Any] | None


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


def upload_name(label: str | None, filename: str | None) -> str:
    """The stored name of an uploaded image, as ingest names a file: label/file name (no client folders), the
    file name alone when unlabelled."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip() or "upload"
    return (f"{label}/{base}" if label else base)[:MAX_NAME]


def match_out(m: Match) -> MatchOut:
    return MatchOut(rank=m.rank, id=m.image_id, name=m.name, label=m.label, score=m.score,
                    url=f"/api/images/{m.image_id}", key=m.key, metadata=m.metadata, suggested=m.suggested,
                    probability=m.probability)


def metadata_field(text: str | None) -> dict[str, Any] | None:
    """The metadata form field: a JSON object, or nothing."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise HTTPException(422, f"metadata is not JSON: {err.msg}") from None
    if not isinstance(value, dict):
        raise HTTPException(422, "metadata must be a JSON object")
    return value


def model_out(snapshot: Snapshot, backbone: str) -> ModelOut:
    model, catalogue = snapshot.model, snapshot.catalogue
    return ModelOut(
        version=snapshot.model_version, backbone=backbone,
        classes=model.classes if model else sorted({c for c in catalogue.labels.tolist() if c is not None}),
        method=snapshot.method,
        methods=[m for m in METHODS if model or not ranking_method(m).needs_model], catalogue_size=len(catalogue),
        params=model.params if model else {}, evaluation=snapshot.evaluation)


def status_of(err: ImageSimilarityError) -> int:
    """The HTTP status that answers an error of the engine (STATUS_OF_KIND)."""
    return next((status for kind, status in STATUS_OF_KIND if isinstance(err, kind)), 500)


def create_app(store: Store, featurizer, max_upload_bytes: int = MAX_UPLOAD_BYTES, *, api_key: str | None = None,
               protect_reads: bool = False, reload_interval: float = 2.0, featurize_added: bool = True,
               db: str | None = None) -> FastAPI:
    """The service on an open store: the latest model, its catalogue and default method are loaded now, and
    reloaded whole when the database's stamp changes (polled every `reload_interval` seconds; 0: never).

    `featurizer` must use the model's backbone (or any backbone with features in the store when there is no
    model). One store connection serves every request thread, under a lock. Catalogue writes need `api_key`
    (sent as `Authorization: Bearer KEY`); without one they answer 401 (no credentials) or 403. `protect_reads`: reads need it too.
    Images added here are featurized in the background when `featurize_added`, on a connection to `db`.
    """
    if protect_reads and not api_key:
        raise BadInput("protecting reads needs an API key")
    service = Service(store, featurizer, reload_interval, featurize_added, db)
    page = files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")

    def check_key(credentials: HTTPAuthorizationCredentials | None) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise HTTPException(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    def can_write(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        if not api_key:  # 401 without credentials (as for any missing key), 403 with some: nobody may write
            raise HTTPException(401 if credentials is None else 403,
                                f"catalogue writes are off: the operator set no API key ({API_KEY_ENV} or "
                                "--api-key-file)", headers={"WWW-Authenticate": "Bearer"} if credentials is None else None)
        check_key(credentials)

    def can_read(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        check_key(credentials)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.stop()

    app = FastAPI(title="image-similarity", version=__version__, lifespan=lifespan,
                  description="Upload an image; get the most similar catalogue images back. Catalogue writes "
                              "need the operator's API key as a Bearer token.")
    app.add_middleware(UploadLimit, limit=max_upload_bytes + FORM_OVERHEAD)

    _error_handlers(app)

    app.state.service = service
    reads = [Depends(can_read)] if protect_reads else []  # open reads declare no security in the schema

    def read_upload(file: UploadFile) -> bytes:
        declared = (file.content_type or "application/octet-stream").lower()
        if not declared.startswith(ACCEPTED_TYPES):
            raise HTTPException(400, f"not an image: uploaded as {declared}")
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, too_large_reason(max_upload_bytes))
        return data

    _query_routes(app, service, store, page, reads, read_upload)
    _write_routes(app, service, store, can_write, read_upload)
    _status_routes(app, service, store, featurizer, reads, max_upload_bytes)
    return app


def _error_handlers(app: FastAPI) -> None:
    """How the service answers errors: HTTP ones as FastAPI does (with a full Allow header), the engine's by kind."""
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        """As FastAPI answers, but a 405's Allow header names the methods of every route on the path (Starlette's
        names only the first route's, e.g. GET without the DELETE of /api/images/{id})."""
        if err.status_code == 405:
            allowed = {m for route in app.router.routes if isinstance(route, APIRoute)
                       and route.path_regex.fullmatch(request.url.path) for m in route.methods}
            err.headers = {**(err.headers or {}), "Allow": ", ".join(sorted(allowed))}
        return await http_exception_handler(request, err)

    @app.exception_handler(ImageSimilarityError)
    async def engine_error(request: Request, err: ImageSimilarityError) -> Response:
        """The one place the service renders the engine's errors: one line, the status of its kind."""
        return JSONResponse({"detail": " ".join(str(err).split())}, status_code=status_of(err))


def _query_routes(app: FastAPI, service: Service, store: Store, page: str, reads: list,
                  read_upload: Callable[[UploadFile], bytes]) -> None:
    """The page, ranking an uploaded image, and a stored image's bytes."""
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @app.post("/api/rank", response_model=RankOut, summary="The catalogue images most similar to an uploaded image",
              dependencies=reads,
              responses={400: {"description": "not an image"}, 413: {"description": "upload too large"}})
    def rank_upload(file: Annotated[UploadFile, File(description="the query image (JPEG, PNG, ...)")],
                    top: Annotated[int, Query(ge=1, le=100, description="how many images")] = 10,
                    method: Annotated[Literal[METHODS] | None,
                                      Query(description="similarity (default: the best evaluated)")] = None,
                    ) -> RankOut:
        data = read_upload(file)
        name = file.filename or "upload"
        snapshot = service.current  # this answer uses this snapshot only, whatever is swapped in meanwhile
        found = snapshot.searcher(method or snapshot.method)
        with service.featurizer.query() as batched:  # its forward pass is batched with concurrent queries'
            result = rank_with(found, data, batched, top, name)
        return RankOut(query=name, method=result.method, backbone=result.backbone,
                       model_version=result.model_version, catalogue_size=len(snapshot.catalogue),
                       matches=[match_out(m) for m in with_suggestions(result.matches, snapshot.suggested)],
                       suggested=result.suggested, probability=result.probability)

    @app.get("/api/images/{image_id}", summary="A catalogue image, as stored", dependencies=reads,
             response_class=Response,
             responses={200: {"content": {"image/*": {}}}, 404: {"description": "no such image"}})
    def image(image_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> Response:
        with service.store_lock:
            data = store.image_bytes(image_id)
        return Response(data, media_type=content_type(data),
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


def _write_routes(app: FastAPI, service: Service, store: Store, can_write: Callable[..., None],
                  read_upload: Callable[[UploadFile], bytes]) -> None:
    """Catalogue writes (they need the API key): add, remove and relabel an image."""
    denied = {401: {"description": "no valid API key"}, 403: {"description": "writes are off: no API key is set"}}

    @app.post("/api/images", status_code=201, response_model=AddedOut, dependencies=[Depends(can_write)],
              summary="Add an image to the catalogue (needs the API key)",
              responses={200: {"description": "these bytes are already stored (under this key, or this name and "
                                              "label)"},
                         400: {"description": "not an image, or identical to a stored image"},
                         413: {"description": "upload too large"}, **denied})
    def add_image(file: Annotated[UploadFile, File(description="the image (JPEG, PNG, ...)")],
                  response: Response,
                  label: Annotated[str | None, Form(min_length=1, max_length=MAX_LABEL, pattern=LABEL_PATTERN,
                                                    description="its class (none: unlabelled)")] = None,
                  key: Annotated[str | None, Form(min_length=1, max_length=MAX_KEY,
                                                  description="your key of the item (unique; a stored key with "
                                                              "other bytes gets this image)")] = None,
                  metadata: Annotated[str | None, Form(max_length=MAX_METADATA,
                                                       description="the item's attributes, a JSON object")] = None,
                  ) -> AddedOut:
        data = read_upload(file)
        name = upload_name(label, file.filename)
        attributes = metadata_field(metadata)
        with service.store_lock:
            image_id, reason = ingest_one(store, name, label, data, stage="upload", key=key, metadata=attributes)
            if image_id is None and reason is None:  # these bytes are stored already (under this key)
                stored = store.find_key(key) if key else store.find_sha256(hashlib.sha256(data).hexdigest())
                image_id, name, label, response.status_code = stored.id, stored.name, stored.label, 200
        if reason:
            raise HTTPException(400, reason)
        service.added()
        return AddedOut(id=image_id, name=name, label=label, url=f"/api/images/{image_id}",
                        featurized_in_background=service.featurize_added, key=key)

    @app.delete("/api/images/{image_id}", response_model=RemovedOut, dependencies=[Depends(can_write)],
                summary="Remove an image from the catalogue (needs the API key); it never appears in a ranking again",
                responses={404: {"description": "no such image"}, **denied})
    def remove_image(image_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> RemovedOut:
        removed = service.remove(image_id)  # every store removes images
        if not removed:
            raise HTTPException(404, f"no image with id {image_id}")
        return RemovedOut(id=image_id, catalogue_size=len(service.current.catalogue))

    @app.put("/api/images/{image_id}/label", response_model=LabelOut, dependencies=[Depends(can_write)],
             summary="Give a catalogue image another label (needs the API key); the next train uses it",
             responses={400: {"description": "unknown label"}, 404: {"description": "no such image"}, **denied})
    def relabel_image(image_id: Annotated[int, Path(ge=1, le=MAX_ID)], body: LabelIn) -> LabelOut:
        previous, label = service.relabel(image_id, body.label, body.new_class)
        return LabelOut(id=image_id, label=label, previous=previous)


def _status_routes(app: FastAPI, service: Service, store: Store, featurizer, reads: list,
                   max_upload_bytes: int) -> None:
    """What the service knows: an audit, the catalogue, stored neighbours, its health and its model."""
    @app.get("/api/audit", response_model=AuditOut, dependencies=reads,
             summary="Catalogue images that are probably mislabelled (image-similarity audit), likeliest first",
             responses={409: {"description": "too few images or classes to audit"}})
    def audit_labels(cutoff: Annotated[float, Query(ge=0.01, le=1, description="least probability of another class")]
                     = CUTOFF, top: Annotated[int, Query(ge=1, le=1000, description="most suspects listed")] = 24
                     ) -> AuditOut:
        report = service.audit(cutoff)
        found = report.to_dict()
        found["suspects"] = [SuspectOut(**s, url=f"/api/images/{s['id']}") for s in found["suspects"][:top]]
        return AuditOut(**found, total_suspects=len(report.suspects))

    @app.get("/api/catalogue", response_model=CatalogueOut, dependencies=reads,
             summary="The catalogue: stored images, how many wait to be featurized, the snapshot in use")
    def catalogue_status() -> CatalogueOut:
        stored, featurized = service.waiting()
        snapshot = service.current
        return CatalogueOut(backbone=featurizer.backbone, images=stored, featurized=featurized,
                            waiting=stored - featurized, featurizing=service.featurizing.is_set(),
                            served=len(snapshot.catalogue), model_version=snapshot.model_version,
                            reload_error=service.reload_error, featurize_error=service.featurize_error)

    @app.get("/api/images/{image_id}/neighbors", response_model=RankOut, dependencies=reads,
             summary="The stored most similar catalogue images of a catalogue image (image-similarity neighbors)",
             responses={404: {"description": "no neighbours stored for this image and method"}})
    def neighbors(image_id: Annotated[int, Path(ge=1, le=MAX_ID)],
                  method: Annotated[Literal[METHODS] | None,
                                    Query(description="similarity (default: the service's)")] = None) -> RankOut:
        snapshot = service.current
        method = method or snapshot.method
        version = snapshot.model_version if snapshot.model_version and ranking_method(method).needs_model else 0
        with service.store_lock:
            rows = store.neighbors(image_id, featurizer.backbone, method, version)
        if not rows:
            raise HTTPException(404, f"no {method} neighbours stored for image {image_id}: "
                                     "run 'image-similarity neighbors'")
        matches = [Match(r, i, name, label, s, *snapshot.catalogue.item(i)) for r, i, name, label, s in rows]
        return RankOut(query=f"image {image_id}", method=method, backbone=featurizer.backbone,
                       model_version=version or None, catalogue_size=len(snapshot.catalogue),
                       matches=[match_out(m) for m in with_suggestions(matches, snapshot.suggested)])

    @app.get("/api/health", response_model=HealthOut, summary="Whether the service is up")
    def health() -> HealthOut:
        return HealthOut(status="ok", version=__version__, images=len(service.current.catalogue),
                         max_upload_bytes=max_upload_bytes)

    @app.get("/api/model", response_model=ModelOut, dependencies=reads,
             summary="The model in use and its evaluation figures")
    def model_info() -> ModelOut:
        return model_out(service.current, featurizer.backbone)
