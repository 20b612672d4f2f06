"""The steps, one module each: ingest, featurize, split, train, evaluate, refine, rank, neighbors."""
