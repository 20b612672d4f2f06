"""One step of the job on a SQLite file, called as the CLI calls it, for tests/test_crash_safety.py to kill:

    python tests/support/crash_step.py ingest|featurize|train|evaluate DB [FOLDER]

(FOLDER: the images for ingest, the plots for evaluate). Imports only what the step needs, so that many killed
runs stay cheap; prints "ready" when it starts the step. Featurize uses batches of 4.
"""
from __future__ import annotations

import sys

from image_similarity.store import SQLiteStore


def main() -> None:
    step, db, folder = (sys.argv[1:] + [""])[:3]
    if step == "ingest":
        from image_similarity.pipeline.ingest import ingest

        def run(store):
            return ingest(store, folder, progress=False)
    elif step == "featurize":
        from image_similarity.pipeline.featurize import Featurizer, featurize

        featurizer = Featurizer(device="cpu")

        def run(store):
            return featurize(store, featurizer, batch_size=4, progress=False)
    elif step == "train":
        from image_similarity.pipeline.train import train as run
    else:
        from image_similarity.pipeline.evaluate import evaluate

        def run(store):
            return evaluate(store, out_dir=folder)
    print("ready", flush=True)
    with SQLiteStore(db) as store:
        run(store)


if __name__ == "__main__":
    main()
