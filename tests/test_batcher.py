"""The service's batcher (entrypoints/batcher.py): concurrent queries share one forward pass and each gets the
features it gets alone; a failure stays with its own query; a lone query never waits; queries overtake the
background featurizing of new uploads; and over HTTP, concurrent rank requests with bad uploads among them."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from support.liveserver import serving

from image_similarity.core.images import decode_image
from image_similarity.entrypoints.batcher import BACKGROUND_CHUNK, BATCH_LIMIT, Batcher
from image_similarity.entrypoints.service import Service
from image_similarity.entrypoints.web import create_app
from image_similarity.errors import BadInput
from image_similarity.features.backbones import prepare_image
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.pipeline.rank import rank
from image_similarity.store import SQLiteStore

TOLERANCE = 1e-5
"""Features of an image in a batch and alone may differ in float32 rounding (some kernels block by batch size)."""


class Recorder:
    """A featurizer that records each forward pass's batch (and can hold the first one until released, or fail
    for a batch holding an all-black image)."""

    def __init__(self, featurizer, hold: bool = False) -> None:
        self.inner, self.batches = featurizer, []
        self.started, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()

    def __getattr__(self, name: str):
        """What featurize reads of a featurizer (backbone, spec, precision, runtime, network hash...): the real one's."""
        return getattr(self.inner, name)

    def submit(self, items):
        return self.inner.submit(items)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        self.started.set()
        self.release.wait()
        self.batches.append((time.monotonic(), batch.copy()))
        if (batch.reshape(len(batch), -1).max(axis=1) == 0).any():
            raise BadInput("an all-black image")
        return self.inner.forward(batch)


@pytest.fixture(scope="module")
def images(sample_dir) -> list:
    """Eight real photos, decoded."""
    paths = [p for label in ("dotted", "leopard", "striped") for p in sorted((sample_dir / label).iterdir())[:3]]
    return [decode_image(p.read_bytes()) for p in paths[:8]]


@pytest.fixture(scope="module")
def alone(featurizer, images) -> np.ndarray:
    return np.concatenate([featurizer.features([im]) for im in images])


def test_queued_queries_share_one_forward_pass_with_their_own_answers(featurizer, images, alone):
    recorder = Recorder(featurizer, hold=True)
    batcher = Batcher(recorder, window=0)
    with ThreadPoolExecutor(len(images)) as pool:
        first = pool.submit(batcher.features, images[:1])
        assert recorder.started.wait(60)  # the first query's pass is running (held): the others queue
        rest = [pool.submit(batcher.features, [im]) for im in images[1:]]
        while len(batcher.queries) < len(rest):
            time.sleep(0.01)
        recorder.release.set()
        got = np.concatenate([first.result()] + [f.result() for f in rest])
    queued = len(images) - 1  # queued while the first ran: taken in batches of at most BATCH_LIMIT, in order
    assert [len(b) for _, b in recorder.batches] == [1, BATCH_LIMIT, queued - BATCH_LIMIT] and batcher.forwards == 3
    np.testing.assert_allclose(got, alone, atol=TOLERANCE)


def test_a_failure_stays_with_its_own_query(featurizer, images, alone):
    recorder = Recorder(featurizer, hold=True)
    batcher = Batcher(recorder, window=0)
    black = images[0].point(lambda _: 0)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.features, images[:1])
        assert recorder.started.wait(60)
        queued = [pool.submit(batcher.features, [im]) for im in (images[1], black, images[2])]
        while len(batcher.queries) < 3:
            time.sleep(0.01)
        recorder.release.set()
        with pytest.raises(BadInput, match="all-black"):
            queued[1].result()
        np.testing.assert_allclose(np.concatenate([first.result(), queued[0].result(), queued[2].result()]),
                                   alone[:3], atol=TOLERANCE)
    assert [len(b) for _, b in recorder.batches] == [1, 3, 1, 1, 1]  # the failed batch, then each alone


def test_a_lone_query_never_waits_for_the_window(featurizer, images, alone):
    batcher = Batcher(featurizer, window=60)
    start = time.monotonic()
    with batcher.query() as ticket:
        got = ticket.features(images[:1])
    assert time.monotonic() - start < 30  # the window (60 s) is for announced queries only; none was
    np.testing.assert_allclose(got, alone[:1], atol=TOLERANCE)


def test_an_announced_query_is_waited_for(featurizer, images, alone):
    """A query still decoding when another's pass could start joins that pass (within the window)."""
    batcher = Batcher(featurizer, window=60)
    with batcher.query() as late, ThreadPoolExecutor(1) as pool:
        first = pool.submit(batcher.features, images[:1])
        while not batcher.busy:
            time.sleep(0.01)
        time.sleep(0.2)  # the first waits for the announced one
        got = late.features(images[1:2])
    np.testing.assert_allclose(np.concatenate([first.result(), got]), alone[:2], atol=TOLERANCE)
    assert batcher.forwards == 1
    with batcher.query():
        pass  # announced, then gone without features: nothing waits for it
    batcher.features(images[2:3])
    assert batcher.forwards == 2


def test_a_query_overtakes_a_running_background_featurize(photo_dirs, sample_dir, featurizer, tmp_path):
    """While new uploads are featurized in the background, a query waits for the chunk in progress at most: no
    background chunk starts between its arrival and its own forward pass."""
    image = decode_image(sorted((sample_dir / "leopard").iterdir())[50].read_bytes())  # not among the uploads
    with SQLiteStore(tmp_path / "growing.sqlite") as store:
        ingest(store, photo_dirs(30), progress=False)
        featurize(store, featurizer, progress=False, id_range=(1, 12))  # served: 12 images; 78 to featurize
        recorder = Recorder(featurizer)
        service = Service(store, recorder, interval=0)
        service.start()
        try:
            service.added()
            while len(recorder.batches) < 2:
                assert service.featurize_error is None
                time.sleep(0.01)
            with service.featurizer.query() as ticket:
                asked = time.monotonic()
                query = prepare_image(image, featurizer.spec)[None]
                ticket.features([image])
            assert service.featurizing.is_set() and service.waiting()[1] < 90  # still featurizing
        finally:
            service.stop()
    passes = [(t, b) for t, b in recorder.batches]
    mine = next(i for i, (_, b) in enumerate(passes) if any(np.array_equal(row, query[0]) for row in b))
    started_meanwhile = [len(b) for t, b in passes[:mine] if t >= asked]
    assert len(passes[mine][1]) == 1 and started_meanwhile == [], [len(b) for _, b in passes]
    assert all(len(b) <= BACKGROUND_CHUNK for i, (_, b) in enumerate(passes) if i != mine)


def test_concurrent_rank_requests_with_bad_uploads(small_dir, featurizer, tmp_path):
    """Eight clients at once over HTTP: each good upload gets what the engine answers it alone, each bad one its
    own one-line 400, and the good ones shared forward passes."""
    photos = [p for label in ("dotted", "leopard", "striped") for p in sorted((small_dir / label).iterdir())[:4]]
    with SQLiteStore(tmp_path / "small.sqlite") as store:
        ingest(store, small_dir, progress=False)
        featurize(store, featurizer, progress=False)
        expected = {p.name: [m.image_id for m in rank(store, p.read_bytes(), featurizer, save=False).matches]
                    for p in photos}
        app = create_app(store, featurizer, featurize_added=False, reload_interval=0)
        uploads = [(p.name, p.read_bytes()) for p in photos] * 2 + [("bad.jpg", b"not an image")] * 4
        with serving(app) as url, ThreadPoolExecutor(8) as pool:
            local = threading.local()

            def ask(upload: tuple[str, bytes]) -> httpx.Response:
                local.client = getattr(local, "client", None) or httpx.Client(base_url=url, timeout=120)
                return local.client.post("/api/rank", files={"file": (upload[0], upload[1], "image/jpeg")})

            answers = list(pool.map(ask, uploads[::2] + uploads[1::2]))
        forwards = app.state.service.featurizer.forwards
    for (name, _), response in zip(uploads[::2] + uploads[1::2], answers):
        if name == "bad.jpg":
            assert response.status_code == 400 and "\n" not in response.json()["detail"], response.text
        else:
            assert response.status_code == 200, response.text
            assert [m["id"] for m in response.json()["matches"]] == expected[name]
    assert forwards < 2 * len(photos), forwards  # some requests shared a forward pass
