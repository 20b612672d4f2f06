"""The package's errors: one base and a few kinds, each rendered in one place per entry point.

The rule: raise an `ImageSimilarityError` of the right kind for whatever a user can cause or fix (bad input,
a step not run yet, a database or package that is not there); internal invariants stay plain exceptions. Every
entry point renders the package's errors in one place, as one line, and leaves anything else, a bug, its traceback:

- `cli.main`: `image-similarity: error: MESSAGE`, exit status 1 (KeyboardInterrupt: 130, with a hint to resume);
- the web service (`web.create_app`): `{"detail": MESSAGE}`, status by kind (`web.STATUS_OF_KIND`): BadInput 400,
  NotFound 404, NotReady 409, Unavailable 503; anything else 500;
- PL/Python (`plpython._clear_errors`): a plain SQL error `image_similarity: MESSAGE`;
- SQL Server (`inproc.reported()`): MESSAGE, which the procedure THROWs (a bug: its type and message, and its
  traceback on stderr).

Errors from what a user names at the edge (a file, a folder) are turned into these kinds where it is named.
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


def first_line(err: BaseException) -> str:
    """An exception's message as one line: its first line, or its type's name when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
