"""Hypothesis strategies the fuzz tests share."""
from __future__ import annotations

from hypothesis import strategies as st

from .fuzzing import seeds

SEEDS = seeds()


@st.composite
def damaged(draw) -> bytes:
    """A seed file with bytes overwritten, inserted or cut, or a garbage tail."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))] or b"\0")
    for _ in range(draw(st.integers(0, 12))):
        at = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["set", "insert", "delete"]))
        if edit == "set":
            data[at] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif len(data) > 1:
            del data[at]
    if draw(st.booleans()):
        data[draw(st.integers(0, len(data))):] = draw(st.binary(max_size=512))
    return bytes(data)
