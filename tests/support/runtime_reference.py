"""The main environment's results on a few bundled photos, which tests/test_sqlserver_profile.py compares with what
SQL Server's procedures compute on the server's Python runtime (Python 3.10, numpy 1.22.0, no torch:
docs/sqlserver-setup.md): a SQLite store where the whole job ran (images, features, split, model, evaluation, the
best method's neighbours), and one test image's features and rankings by every method.

`python -m support.runtime_reference FOLDER` (PYTHONPATH=Python:tests) writes them with the main virtualenv's torch;
.ci/sqlserver-profile does, then runs that test file in the profile's virtualenv.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from image_similarity.resources import SAMPLE_DATASET
from image_similarity.store import SQLiteStore
from support.catalogues import first_photos, whole_job

PER_CLASS = 12
STORE, QUERY = "engine.sqlite", "query.json"
METHODS = ("", "l2", "cosine", "scores", "learned")
"""RankCandidates' @method values: '' is the procedure's default (the best method of the latest evaluation)."""
NEIGHBORS = 4


def build(folder: Path) -> Path:
    """`folder`, holding STORE and QUERY (the query's id, its features, and each method's matches)."""
    from image_similarity.core.images import decode_image
    from image_similarity.pipeline.featurize import Featurizer
    from image_similarity.pipeline.neighbors import neighbors
    from image_similarity.pipeline.rank import rank
    from image_similarity.pipeline.train import load_model

    featurizer = Featurizer(device="cpu")
    summary = whole_job(folder / STORE, first_photos(SAMPLE_DATASET, folder / "photos", PER_CLASS), featurizer)
    with SQLiteStore(folder / STORE) as store:
        query = min(i for i, subset in store.split().items() if subset == "test")
        data = store.image_bytes(query)
        model = load_model(store)
        rankings = {m: rank(store, data, featurizer, method=m or None, model=model, save=False) for m in METHODS}
        neighbors(store, featurizer.backbone, summary["best_method"], k=NEIGHBORS, progress=False)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    vector = featurizer.features([decode_image(data)])[0]
    (folder / QUERY).write_text(json.dumps({
        "id": query, "backbone": featurizer.backbone, "vector": vector.tolist(),  # float32 values, exact in JSON
        "rankings": {m: {"method": r.method, "ids": [x.image_id for x in r.matches],
                         "scores": [x.score for x in r.matches]} for m, r in rankings.items()}}))
    return folder


if __name__ == "__main__":
    build(Path(sys.argv[1]))
