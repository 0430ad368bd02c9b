"""The compiled DataRow loop (agent/protocols/_pgscan.c) answers exactly as its Python twin."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocols import postgres as pg
from tests.support.fuzz import examples
from tests.support.native import compiled


def native() -> Any:
    return compiled("agent.protocols._pgscan", "datarows", pg.NATIVE_SCAN)


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


# Whole messages, DataRows most of all, plus raw bytes: headers with lengths that are
# negative, too small, or run past the end.
_parts = st.one_of(
    st.binary(max_size=40).map(lambda body: message(b"D", body)),
    st.binary(max_size=40).map(lambda body: message(b"D", body)),
    st.tuples(st.sampled_from(b"CZTEdNs"), st.binary(max_size=12)).map(
        lambda kb: message(bytes([kb[0]]), kb[1])),
    st.integers(-(2**31), 2**31 - 1).map(lambda n: b"D" + struct.pack("!i", n)),
    st.binary(max_size=6),
)


@settings(max_examples=examples(2000), deadline=None)
@given(st.lists(_parts, max_size=12).map(b"".join), st.data())
def test_same_run_as_python(data: bytes, draw: st.DataObject) -> None:
    datarows = native()
    pos = draw.draw(st.integers(0, len(data)))
    assert datarows(data, pos) == pg._datarows(data, pos)
    assert datarows(bytearray(data), pos) == pg._datarows(data, pos)


def test_counts_a_run_and_stops_where_the_scanner_takes_over() -> None:
    datarows = native()
    rows = message(b"D", b"\x00\x01\x00\x00\x00\x01x") * 3
    tail = message(b"C", b"SELECT 3\x00")
    assert datarows(rows + tail, 0) == (len(rows), 3, len(rows))
    # A row cut short at the end of the chunk, an invalid length: not counted.
    assert datarows(rows + rows[:7], 0) == (len(rows), 3, len(rows))
    assert datarows(b"D\x00\x00\x00\x03", 0) == (0, 0, 0)
    assert datarows(b"D\xff\xff\xff\xff" + rows, 0) == (0, 0, 0)
    assert datarows(rows, len(rows)) == (len(rows), 0, 0)


def test_bad_arguments_are_errors_not_crashes() -> None:
    datarows = native()
    with pytest.raises(ValueError, match="outside"):
        datarows(b"D", 2)
    with pytest.raises(ValueError, match="outside"):
        datarows(b"D", -1)
    with pytest.raises(TypeError):
        datarows("text", 0)
    with pytest.raises(TypeError):
        datarows(b"D")


def _same_float(a: float, b: float) -> bool:
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b) or (
        math.isnan(a) and math.isnan(b))


# Durations in seconds as a clock gives them, thousandths of a millisecond and the halves
# between them (where rounding is decided), and every other float.
_seconds = st.one_of(
    st.floats(min_value=0.0, max_value=2000.0),
    st.integers(0, 10**12).map(lambda n: n / 1e6),
    st.integers(0, 10**12).map(lambda n: (n + 0.5) / 1e6),
    st.integers(0, 10**12).map(lambda n: (n + 0.5) / 1e9),
    st.floats(allow_nan=True, allow_infinity=True),
)


@settings(max_examples=examples(5000), deadline=None)
@given(_seconds)
def test_duration_is_rounded_as_python_rounds_it(seconds: float) -> None:
    """The result records' duration_ms on the compiled path is the Python path's
    ``round(seconds * 1000.0, 3)``, to the last bit."""
    duration_ms = compiled("agent.protocols._pgscan", "duration_ms",
                           pg.native_client_step is not None)
    try:
        expected = round(seconds * 1000.0, 3)
    except (OverflowError, ValueError) as e:  # infinity, NaN
        with pytest.raises(type(e)):
            duration_ms(seconds)
        return
    assert _same_float(duration_ms(seconds), expected), (seconds, expected)


def test_duration_edges() -> None:
    duration_ms = compiled("agent.protocols._pgscan", "duration_ms",
                           pg.native_client_step is not None)
    for seconds in (0.0, -0.0, -1e-7, 5e-7, 1.5e-6, 2.5e-6, 0.0012345, 0.0012355, 999.9999995,
                    1000.0, 1e9, 5e-324, 1.7976931348623157e308):
        assert _same_float(duration_ms(seconds), round(seconds * 1000.0, 3)), seconds
    with pytest.raises(TypeError):
        duration_ms("1.0")
