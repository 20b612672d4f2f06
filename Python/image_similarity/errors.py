"""The package's errors: one base and a few kinds, each rendered in one place per entry point.

`cli.main`, the web service, the PL/Python routines and the SQL Server entry points turn an `ImageSimilarityError`
into one line (and, on the web, a status code by its kind). Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class ImageSimilarityError(Exception):
    """An error the user can act on; its message is one line that says what to do."""


class BadInput(ImageSimilarityError, ValueError):
    """The caller's input is wrong: an option, a file, an image, a name."""


class NotFound(BadInput, LookupError):
    """The caller named something that is not there: an image id, a folder, a network."""


class NotReady(ImageSimilarityError):
    """An earlier step has to run first; the message names it ("run 'image-similarity train' first")."""


class Unavailable(ImageSimilarityError):
    """Something the step needs cannot be reached or is not installed: a database, a cluster, a package, weights."""


class StoreError(Unavailable):
    """The database cannot be reached, opened or used as asked (connection, credentials, schema, capability)."""
