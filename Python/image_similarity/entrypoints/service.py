"""What the web service answers from: an immutable snapshot (model, catalogue, default method) loaded in one read
transaction and swapped whole, with a searcher per method made on its first request; a poller that reloads it when
the database's version stamp changes, and a background featurizer for images added through the service. Every
forward pass goes through one batcher (batcher.py): queries batched together, ahead of the background's."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import NotReady, first_line
from ..pipeline.audit import AuditReport, at_cutoff, audit, relabel
from ..pipeline.featurize import featurize
from ..pipeline.rank import default_method, latest_model
from ..pipeline.suggest import catalogue_suggestions
from ..search.catalogue import Catalogue
from ..search.methods import scoring_method
from ..search.model import SimilarityModel
from ..search.searchers import DatabaseSearcher, Searcher, in_database, searcher
from ..store import VECTOR_SEARCH, Store, connect
from .batcher import Batcher

log = logging.getLogger("image_similarity.entrypoints.service")
AUDIT_FLOOR = 1e-6
"""The cut-off the service audits at, once per catalogue; each request's higher one filters that report."""


@dataclass(frozen=True)
class Snapshot:
    """Everything one answer is made from, never changed once made: requests take the current one and use
    only it, so no answer mixes two model versions or two catalogues. The searcher of a method is made from it on
    the method's first request and kept (memory holds only the methods asked for)."""

    stamp: tuple[int, ...] | None
    """The store's catalogue_stamp when it was read (None: changed here since, reload on the next poll)."""
    catalogue: Catalogue
    model: SimilarityModel | None
    method: str
    evaluation: dict[str, Any] | None
    suggested: dict[int, tuple[str, float]] = field(default_factory=dict, repr=False, compare=False)
    """image id -> the model's (suggested label, probability) of each unlabelled catalogue image (issue 29)."""
    searchers: dict[str, Searcher] = field(default_factory=dict, repr=False, compare=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    database: tuple[Store, str, threading.Lock] | None = field(default=None, repr=False, compare=False)
    """(store, backbone, the lock its connection is used under) of a store with vector search: methods whose
    vectors it holds are ranked there (search.searchers.DatabaseSearcher)."""

    @property
    def model_version(self) -> int | None:
        return self.model.version if self.model else None

    def searcher(self, method: str) -> Searcher:
        """The searcher of `method` over this catalogue and model: in the database when it ranks the method itself,
        else in memory (HNSW for l2/cosine on large catalogues)."""
        with self.lock:
            if method not in self.searchers:
                self.searchers[method] = self._searcher(method)
            return self.searchers[method]

    def _searcher(self, method: str) -> Searcher:
        scoring = scoring_method(method, self.model)
        if self.database is not None:
            store, backbone, lock = self.database
            with lock:
                here = in_database(store, backbone, scoring)
            if here:
                return DatabaseSearcher(store, backbone, scoring, None, self.catalogue, lock)
        return searcher(self.catalogue, method, self.model)


def load_snapshot(store: Store, backbone: str, lock: threading.Lock | None = None) -> Snapshot:
    """The latest model, its evaluation and default method, and the catalogue, from one read transaction; with
    the `lock` the store is used under, a store with vector search ranks the methods it can (Snapshot.database)."""
    with store.reading():
        stamp = store.catalogue_stamp(backbone)
        model = latest_model(store)
        if model is not None and model.backbone != backbone:
            raise NotReady(f"the latest model (version {model.version}) uses {model.backbone} features but this "
                           f"service featurizes with {backbone}: restart serve to use it")
        catalogue = Catalogue.from_store(store, backbone)
        evaluation = store.evaluation(model.version) if model else None
        method = default_method(store, model)
    summary = {k: v for k, v in evaluation.summary.items() if k != "plots"} if evaluation else None
    database = (store, backbone, lock) if lock is not None and VECTOR_SEARCH in store.capabilities else None
    return Snapshot(stamp, catalogue, model, method, summary, catalogue_suggestions(catalogue, model),
                    database=database)


def without(snapshot: Snapshot, image_id: int) -> Snapshot:
    """The snapshot less one catalogue image (stamp None, so the next poll reloads it from the database)."""
    return Snapshot(None, snapshot.catalogue.without([image_id]), snapshot.model, snapshot.method, snapshot.evaluation,
                    snapshot.suggested, database=snapshot.database)


class Service:
    """The current snapshot of one store and backbone, kept up to date.

    `store` is one connection shared by every request thread: use it under `store_lock`. `current` is swapped
    whole (a reference assignment) under `swap_lock`, which also orders reloads against removals, so an image
    removed here never comes back. `watch()` polls the stamp every `interval` seconds in a thread (0: never).
    `featurizer` is the given one behind a Batcher: every forward pass, the queries' and the background's, runs
    there.
    """

    def __init__(self, store: Store, featurizer, interval: float = 2.0, featurize_added: bool = True,
                 db: str | None = None) -> None:
        self.store, self.interval = store, interval
        self.featurizer = featurizer if isinstance(featurizer, Batcher) else Batcher(featurizer)
        self.db = db or store.url
        """What the background featurizer connects to (a URL with the user name, which store.url leaves out)."""
        self.store_lock, self.swap_lock, self.audit_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._audit: tuple[tuple, AuditReport] | None = None
        self.current = load_snapshot(store, featurizer.backbone, self.store_lock)
        self.reload_error: str | None = None
        self.featurize_added = featurize_added
        self.featurizing = threading.Event()
        self.featurize_error: str | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []

    def reload_if_changed(self) -> bool:
        """Reload when the store's stamp differs from the current snapshot's; True when it swapped."""
        with self.swap_lock:
            with self.store_lock:
                stamp = self.store.catalogue_stamp(self.featurizer.backbone)
                if stamp == self.current.stamp:
                    return False
                snapshot = load_snapshot(self.store, self.featurizer.backbone, self.store_lock)
            self.current = snapshot
        log.info("serving model version %s on %d images", snapshot.model_version, len(snapshot.catalogue))
        return True

    def remove(self, image_id: int) -> bool:
        """Remove an image from the store and from the served catalogue at once; False when there is none."""
        with self.swap_lock:
            with self.store_lock:
                removed = self.store.remove_image(image_id)
            if removed:
                self.current = without(self.current, image_id)
        return removed

    def relabel(self, image_id: int, label: str, new_class: bool = False) -> tuple[str, str]:
        """Relabel an image in the store (audit.relabel) and serve the catalogue with its new label at once;
        (old label, new label)."""
        with self.swap_lock, self.store_lock:
            change = relabel(self.store, image_id, label, new_class)
            self.current = load_snapshot(self.store, self.featurizer.backbone)
        return change

    def audit(self, cutoff: float) -> AuditReport:
        """The label audit of the catalogue at `cutoff`, computed on a connection of its own (the store lock is not
        held meanwhile), one at a time, and again only when the features, model or labels changed."""
        with self.store_lock:
            key = (self.store.catalogue_stamp(self.featurizer.backbone),
                   hash(tuple((im.id, im.label) for im in self.store.images())))
        with self.audit_lock:
            if self._audit is None or self._audit[0] != key:
                model = self.current.model
                with connect(self.db) as own:  # the served model's C: no grid search while a client waits
                    self._audit = key, audit(own, self.featurizer.backbone, cutoff=AUDIT_FLOOR,
                                             C=model.params.get("C") if model else None)
            return at_cutoff(self._audit[1], cutoff)

    def waiting(self) -> tuple[int, int]:
        """(stored images, of them featurized with the service's backbone)."""
        with self.store_lock, self.store.reading():
            return len(self.store.images()), self.store.feature_counts().get(self.featurizer.backbone, 0)

    def added(self) -> None:
        """An image was added: featurize it in the background (when enabled)."""
        if self.featurize_added:
            self._wake.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.reload_if_changed()
                self.reload_error = None
            except Exception as err:  # noqa: BLE001 - keep serving the last good snapshot, say why
                self.reload_error = first_line(err)
                log.warning("reload failed, still serving model version %s: %s", self.current.model_version,
                            self.reload_error)

    def _featurize(self) -> None:
        own = None
        while not self._stop.is_set():
            if not self._wake.wait(0.5):
                continue
            self._wake.clear()
            self.featurizing.set()
            try:
                own = own or connect(self.db)  # its own connection: the shared one stays free
                featurize(own, self.featurizer.background, progress=False)
                self.featurize_error = None
                self.reload_if_changed()
            except Exception as err:  # noqa: BLE001 - reported by the status endpoint, retried on the next add
                self.featurize_error = first_line(err)
                log.warning("background featurize failed: %s", self.featurize_error)
            finally:
                self.featurizing.clear()
        if own is not None:
            own.close()

    def start(self) -> None:
        """Start the stamp poller (when interval > 0) and the background featurizer (when enabled)."""
        targets = ([self._poll] if self.interval > 0 else []) + ([self._featurize] if self.featurize_added else [])
        self._threads = [threading.Thread(target=t, name=t.__name__, daemon=True) for t in targets]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

