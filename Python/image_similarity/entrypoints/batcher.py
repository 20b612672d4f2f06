"""The service's forward passes, all run by one thread: concurrent queries are gathered into one batch (whatever is
queued when the network is free, up to a limit, waiting a short window only for queries already being decoded),
and the background featurizing of new uploads runs in small chunks only while no query waits."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..features.backbones import prepare_image

BATCH_LIMIT = 4
"""At most this many query images in one forward pass: on 2 cores (an AMD EPYC, natively and with AVX2 kernels
forced), 4 images cost the least time per image; 8 cost 15-35% more per image than 4 (docs/service.md)."""
WINDOW = 0.005
"""Seconds a gathered batch waits, at most, for queries announced but still decoding (never when none is)."""
BACKGROUND_CHUNK = 2
"""Images per forward pass of the background featurizer: what a query arriving meanwhile waits for, at most."""


@dataclass
class Job:
    """Network inputs, uint8 (n, S, S, 3), waiting for their float32 (n, dim) features or the error."""

    batch: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None

    def wait(self) -> np.ndarray:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Wrapped:
    """The Featurizer's facts and decode pool, of the featurizer `inner`."""

    def __init__(self, featurizer) -> None:
        self.inner = featurizer

    @property
    def backbone(self) -> str:
        return self.inner.backbone

    @property
    def device(self):
        return self.inner.device

    @property
    def spec(self):
        return self.inner.spec

    @property
    def precision(self) -> str:
        return self.inner.precision

    def submit(self, items):
        return self.inner.submit(items)


class Batcher(Wrapped):
    """A featurizer (the Featurizer API) whose forward passes one thread runs: `features` and `forward` (queries)
    batched together, `background.forward` (featurizing uploads) in chunks of BACKGROUND_CHUNK images, only while
    no query is queued or announced (`query()`)."""

    def __init__(self, featurizer, limit: int = BATCH_LIMIT, window: float = WINDOW,
                 chunk: int = BACKGROUND_CHUNK) -> None:
        super().__init__(featurizer)
        self.limit, self.window, self.chunk = limit, window, chunk
        self.cond = threading.Condition()
        self.queries: deque[Job] = deque()
        self.chunks: deque[Job] = deque()
        self.announced = 0
        """Queries on their way (decoding), not queued yet: a gathered batch waits a little for them."""
        self.forwards = 0
        """Forward passes run so far (queries' and the background's)."""
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.background = Background(self)

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Feature vectors of decoded RGB images (prepared in the caller's thread), batched with other queries."""
        return self.forward(prepared(images, self.spec))

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, dim), as a query: gathered with the other queries queued."""
        return self._put(Job(batch), self.queries).wait()

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

    def _put(self, job: Job, queue: deque[Job], arriving: bool = False) -> Job:
        with self.cond:
            if self.thread is None:
                self.stopping = False
                self.thread = threading.Thread(target=self._run, name="forward-batcher", daemon=True)
                self.thread.start()
            self.announced -= arriving
            queue.append(job)
            self.cond.notify_all()
        return job

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(self._ready)
                if not self.queries and not self.chunks:
                    return  # stopping, and nothing left to do
                jobs = self._gather() if self.queries else [self.chunks.popleft()]
            self._forward(jobs)

    def _ready(self) -> bool:
        return bool(self.queries) or (bool(self.chunks) and not self.announced) or self.stopping

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
            job.done.set()

    def close(self) -> None:
        """Finish what is queued and stop the thread (a later call starts it again)."""
        with self.cond:
            thread, self.stopping = self.thread, True
            self.cond.notify_all()
        if thread is not None:
            thread.join()
        with self.cond:
            self.thread = None


class Ticket(Wrapped):
    """One announced query's view of the batcher (a featurizer, as rank_with uses one)."""

    def __init__(self, batcher: Batcher) -> None:
        super().__init__(batcher.inner)
        self.batcher, self.waiting = batcher, True

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """As Batcher.features; the first call ends the announcement."""
        batch = prepared(images, self.spec)
        arriving, self.waiting = self.waiting, False
        return self.batcher._put(Job(batch), self.batcher.queries, arriving).wait()

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
        jobs = [self.batcher._put(Job(batch[i:i + self.batcher.chunk]), self.batcher.chunks)
                for i in range(0, len(batch), self.batcher.chunk)]
        return np.concatenate([j.wait() for j in jobs])


def prepared(images: Sequence[Image.Image], spec) -> np.ndarray:
    """The network's uint8 input for decoded RGB images, as Featurizer.features makes it."""
    return np.stack([prepare_image(im, spec) for im in images])
