"""The audit writer's compiled per-record work (audit/_link.c) answers exactly as its Python twin."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import audit.log as audit_log
from audit.schema import ENVELOPE_VERSION, SESSION_END, SESSION_START
from tests.support.fuzz import examples
from tests.support.native import compiled


def native() -> Any:
    return compiled("audit._link", "link", audit_log.NATIVE_LINK)


_WAITER = object()  # a strict record's waiter: only its presence matters here

_items = st.tuples(
    st.sampled_from([SESSION_START, SESSION_END, "query", "result", "agent.start"]),
    st.sampled_from([None, "s1", "s2", "s3"]),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=64),
    st.sampled_from([None, None, None, _WAITER, 7]),
)


def _state(draw: st.DrawFn) -> dict[str, Any]:
    size = draw(st.integers(0, 2**20))
    return {
        "seq": draw(st.integers(0, 2**40)),
        "prev": draw(st.binary(min_size=32, max_size=32)),
        "stack": [draw(st.binary(min_size=32, max_size=32)) for _ in range(size.bit_count())],
        "size": size,
        # Names cached for some types and sessions only: the rest come from encode_names.
        "enc_type": {t: msgpack.packb(t) for t in draw(st.sets(st.sampled_from(["query", "result"])))},
        "enc_sid": {s: msgpack.packb("host") + msgpack.packb(s)
                    for s in draw(st.sets(st.sampled_from([None, "s1"])))},
        "counters": {s: draw(st.integers(0, 1000)) for s in draw(st.sets(st.sampled_from(["s1", "s3"])))},
    }


states = st.composite(_state)


def run(link: Any, batch: list[Any], state: dict[str, Any]) -> tuple[Any, ...]:
    s = copy.deepcopy(state)
    calls: list[tuple[str, str | None]] = []

    def encode_names(type: str, sid: str | None) -> bytes:
        calls.append((type, sid))
        s["enc_type"][type] = msgpack.packb(type)
        s["enc_sid"][sid] = msgpack.packb("host") + msgpack.packb(sid)
        return bytes(s["enc_type"][type] + s["enc_sid"][sid])

    out = link(batch, s["seq"], s["prev"], s["stack"], s["size"], ENVELOPE_VERSION,
               s["enc_type"], s["enc_sid"], encode_names, s["counters"], SESSION_START, SESSION_END)
    return out, s["stack"], s["counters"], calls


@settings(max_examples=examples(1000), deadline=None)
@given(st.lists(_items, max_size=40), states())
def test_same_records_and_hashes_as_python(batch: list[Any], state: dict[str, Any]) -> None:
    assert run(native(), batch, state) == run(audit_log._link_py, batch, state)


def test_bad_items_are_errors_not_crashes() -> None:
    link = native()
    args: tuple[Any, ...] = (0, b"\x00" * 32, [], 0, ENVELOPE_VERSION, {}, {}, lambda t, s: b"", {},
                             SESSION_START, SESSION_END)
    with pytest.raises(TypeError):
        link([("query", None, 1, "not bytes", None)], *args)
    with pytest.raises(TypeError):
        link([("query", None, 1)], *args)
    with pytest.raises(OverflowError):
        link([("query", None, -1, b"", None)], *args)
    with pytest.raises(ValueError, match="frontier"):
        link([("query", None, 1, b"", None)], 0, b"\x00" * 32, [], 1, ENVELOPE_VERSION, {}, {},
             lambda t, s: b"", {}, SESSION_START, SESSION_END)
