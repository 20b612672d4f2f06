"""PostgreSQL's binary COPY format, built by numpy: rows of a few constant values, an image id and a float32 vector
each (the features, the rows of scores and learned) as one buffer, without a Python object per value."""
from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)


def _column(value: int | str) -> tuple[str, int | bytes]:
    """(numpy type, value) of a constant: an int as int4, a str as (non-empty) text."""
    return (f"S{len(value.encode())}", value.encode()) if isinstance(value, str) else (">i4", int(value))


def copy_buffer(constants: Sequence[int | str], ids: Sequence[int], vectors: np.ndarray) -> bytes:
    """The input of `COPY table (constant columns, image_id, embedding) FROM STDIN (FORMAT BINARY)`: per row the
    constants (int: int4, str: text), the id (int8) and its row of `vectors` as pgvector's `vector_recv` reads it
    (int16 dimension, int16 unused, big-endian float32s). Every row has the same length: one structured array."""
    vectors = np.asarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    fields = [("columns", ">i2")]
    for k, value in enumerate(constants):
        fields += [(f"length{k}", ">i4"), (f"value{k}", _column(value)[0])]
    fields += [("id_length", ">i4"), ("id", ">i8"), ("vector_length", ">i4"), ("dim", ">i2"), ("unused", ">i2"),
               ("vector", ">f4", (dim,))]
    rows = np.zeros(n, dtype=np.dtype(fields))
    rows["columns"] = len(constants) + 2
    for k, value in enumerate(constants):
        rows[f"length{k}"] = rows.dtype[f"value{k}"].itemsize
        rows[f"value{k}"] = _column(value)[1]
    rows["id_length"], rows["id"] = 8, np.asarray(ids, dtype=np.int64)
    rows["vector_length"], rows["dim"], rows["vector"] = 4 + 4 * dim, dim, vectors
    return HEADER + rows.tobytes() + TRAILER
