"""Featurize: one vector per image and backbone, streamed, resumable, bad stored bytes skipped."""
from __future__ import annotations

import numpy as np
import pytest

from image_similarity.errors import NotReady
from image_similarity.pipeline.featurize import featurize
from image_similarity.pipeline.ingest import ingest
from image_similarity.store import SQLiteStore


@pytest.fixture
def small_store(tmp_path, small_dir):
    with SQLiteStore(tmp_path / "db.sqlite") as store:
        ingest(store, small_dir, progress=False)
        yield store


def test_every_image_gets_one_finite_vector(small_store, featurizer):
    report = featurize(small_store, featurizer, batch_size=8, progress=False)
    assert (report.added, report.skipped) == (36, [])
    ids, X = small_store.features(featurizer.backbone)
    assert X.shape == (36, featurizer.spec.feature_dim) and X.dtype == np.float32 and np.isfinite(X).all()
    assert list(ids) == [im.id for im in small_store.images()]
    assert featurize(small_store, featurizer, progress=False).added == 0


def test_interrupted_run_resumes_losing_at_most_one_batch(small_store, featurizer, monkeypatch):
    real_forward, calls = featurizer.forward, []

    def dying_forward(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_forward(batch)

    monkeypatch.setattr(featurizer, "forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        featurize(small_store, featurizer, batch_size=5, progress=False)
    assert small_store.feature_counts()[featurizer.backbone] == 10
    monkeypatch.setattr(featurizer, "forward", real_forward)
    report = featurize(small_store, featurizer, batch_size=5, progress=False)
    assert report.added == 26
    ids, _ = small_store.features(featurizer.backbone)
    assert len(ids) == len(set(ids)) == 36


def test_features_do_not_depend_on_batch_size(small_store, featurizer, tmp_path, small_dir):
    featurize(small_store, featurizer, batch_size=36, progress=False)
    with SQLiteStore(tmp_path / "other.sqlite") as other:
        ingest(other, small_dir, progress=False)
        featurize(other, featurizer, batch_size=7, progress=False)
        np.testing.assert_allclose(other.features(featurizer.backbone)[1],
                                   small_store.features(featurizer.backbone)[1], atol=1e-4)


def test_corrupt_bytes_in_the_table_are_skipped_and_recorded(small_store, featurizer):
    small_store.conn.execute("UPDATE images SET data = X'00FF00' WHERE id = 3")
    small_store.conn.commit()
    report = featurize(small_store, featurizer, progress=False)
    assert report.added == 35 and [i for i, _ in report.skipped] == [3]
    assert ("image id 3", "featurize") in {(n, s) for n, _, s, _ in small_store.rejected()}


def test_features_of_another_dimension_are_refused_not_mixed(small_store, featurizer):
    """Vectors an older version stored (1280-d pooled features) are never mixed with this version's."""
    ids = [im.id for im in small_store.images()[:3]]
    small_store.put_features(featurizer.backbone, ids, np.ones((3, 1280), dtype=np.float32))
    with pytest.raises(NotReady, match=f"have 1280 dimensions and this version computes {featurizer.spec.feature_dim}"):
        featurize(small_store, featurizer, progress=False)
    assert small_store.feature_counts() == {featurizer.backbone: 3}
    assert small_store.feature_dim(featurizer.backbone) == 1280 and small_store.feature_dim("mobilenet_v2") is None
