"""The service's forward passes, one at a time: concurrent queries are gathered into one batch (whatever is queued
when the network is free, up to a limit, waiting a short window only for queries already being decoded), and the
background featurizing of new uploads runs in small chunks only while no query waits."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..features.backbones import prepare_image

BATCH_LIMIT = 4
"""At most this many query images in one forward pass: on 2 cores (an AMD EPYC, natively and with AVX2 kernels
forced), 4 images cost the least time per image; 8 cost 19-37% more per image than 4 (docs/service.md)."""
WINDOW = 0.005
"""Seconds a gathered batch waits, at most, for queries announced but still decoding (never when none is)."""
BACKGROUND_CHUNK = 2
"""Images per forward pass of the background featurizer: what a query arriving meanwhile waits for, at most."""


@dataclass
class Job:
    """Network inputs, uint8 (n, S, S, 3), waiting for their float32 (n, dim) features or the error."""

    batch: np.ndarray
    done: bool = False
    result: np.ndarray | None = None
    error: BaseException | None = None


class Wrapped:
    """A view of the featurizer `inner` whose forward passes go through a batcher: what it lacks (backbone, spec,
    device, precision, the decode pool, whatever else a step reads of a featurizer) is `inner`'s."""

    def __init__(self, featurizer) -> None:
        self.inner = featurizer

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Feature vectors of decoded RGB images, prepared in the caller's thread as Featurizer.features does."""
        return self.forward(np.stack([prepare_image(im, self.spec) for im in images]))


class Batcher(Wrapped):
    """A featurizer (the Featurizer API) whose forward passes run one at a time: `features` and `forward` (queries)
    batched together, `background.forward` (featurizing uploads) in chunks of BACKGROUND_CHUNK images, only while
    no query is queued or announced (`query()`). No thread of its own: a caller that finds the network free runs
    the next pass itself (for whoever is queued), so a lone query runs in its own thread, with no hand-over."""

    def __init__(self, featurizer, limit: int = BATCH_LIMIT, window: float = WINDOW,
                 chunk: int = BACKGROUND_CHUNK) -> None:
        super().__init__(featurizer)
        self.limit, self.window, self.chunk = limit, window, chunk
        self.cond = threading.Condition()
        self.queries: deque[Job] = deque()
        self.chunks: deque[Job] = deque()
        self.announced = 0
        """Queries on their way (decoding), not queued yet: a gathered batch waits a little for them."""
        self.busy = False
        """A caller is gathering or running a forward pass."""
        self.forwards = 0
        """Forward passes run so far (queries' and the background's)."""
        self.background = Background(self)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, dim), as a query: gathered with the other queries queued."""
        return self._done(self._put([Job(batch)], self.queries)[0])

    @contextmanager
    def query(self) -> Iterator[Ticket]:
        """Announce a query for the block (its image is being decoded): a batch gathered meanwhile waits up to the
        window for it, and background chunks wait. Its first `features` call ends the announcement."""
        ticket = Ticket(self)
        with self.cond:
            self.announced += 1
        try:
            yield ticket
        finally:
            ticket.arrived()

    def _put(self, jobs: list[Job], queue: deque[Job], arriving: bool = False) -> list[Job]:
        with self.cond:
            self.announced -= arriving
            queue.extend(jobs)
            self.cond.notify_all()
        return jobs

    def _done(self, job: Job) -> np.ndarray:
        """`job`'s features: run forward passes in this thread (the first queued first) whenever the network is
        free and there is work that may run, until `job` is done."""
        with self.cond:
            while not job.done:
                if self.busy or not self._ready():
                    self.cond.wait()
                    continue
                self.busy = True
                try:
                    jobs = self._gather() if self.queries else [self.chunks.popleft()]
                    self.cond.release()
                    try:
                        self._forward(jobs)
                    finally:
                        self.cond.acquire()
                finally:
                    self.busy = False
                    self.cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _ready(self) -> bool:
        return bool(self.queries) or (bool(self.chunks) and not self.announced)

    def _gather(self) -> list[Job]:
        """Queued queries up to the batch limit, after waiting up to the window for announced ones (under cond)."""
        deadline = time.monotonic() + self.window
        while self.announced and sum(len(j.batch) for j in self.queries) < self.limit:
            left = deadline - time.monotonic()
            if left <= 0 or not self.cond.wait(left):
                break
        jobs = [self.queries.popleft()]
        size = len(jobs[0].batch)
        while self.queries and size + len(self.queries[0].batch) <= self.limit:
            jobs.append(self.queries.popleft())
            size += len(jobs[-1].batch)
        return jobs

    def _forward(self, jobs: list[Job]) -> None:
        """One forward pass for these jobs; if it fails, each job alone, so an error stays with its own job."""
        try:
            self.forwards += 1
            out = self.inner.forward(np.concatenate([j.batch for j in jobs]))
        except Exception as err:  # noqa: BLE001 - handed to the job's own caller
            if len(jobs) > 1:
                for job in jobs:
                    self._forward([job])
                return
            jobs[0].error = err
        else:
            start = 0
            for job in jobs:
                job.result, start = out[start:start + len(job.batch)], start + len(job.batch)
        for job in jobs:
            job.done = True


class Ticket(Wrapped):
    """One announced query's view of the batcher (a featurizer, as rank_with uses one)."""

    def __init__(self, batcher: Batcher) -> None:
        super().__init__(batcher.inner)
        self.batcher, self.waiting = batcher, True

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """As Batcher.forward; the first call ends the announcement."""
        arriving, self.waiting = self.waiting, False
        return self.batcher._done(self.batcher._put([Job(batch)], self.batcher.queries, arriving)[0])

    def arrived(self) -> None:
        """The query left without (more) features: no batch waits for it."""
        if self.waiting:
            self.waiting = False
            with self.batcher.cond:
                self.batcher.announced -= 1
                self.batcher.cond.notify_all()


class Background(Wrapped):
    """The batcher as the background featurizer sees it: forward passes in chunks, after every query."""

    def __init__(self, batcher: Batcher) -> None:
        super().__init__(batcher.inner)
        self.batcher = batcher

    def forward(self, batch: np.ndarray) -> np.ndarray:
        chunk = self.batcher.chunk
        jobs = self.batcher._put([Job(batch[i:i + chunk]) for i in range(0, len(batch), chunk)], self.batcher.chunks)
        return np.concatenate([self.batcher._done(job) for job in jobs])

