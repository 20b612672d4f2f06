"""Image similarity engine: ingest, featurize, split, train, evaluate and rank images stored in a database."""

__version__ = "0.1.0"
