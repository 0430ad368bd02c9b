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


def native(name: str = "link") -> Any:
    return compiled("audit._link", name, audit_log.NATIVE_LINK)


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


# ------------------------------------------------------------- batch frames

_TYPES = frozenset({"query", "result", SESSION_START})
# Events as the agent encodes them (small maps), or any bytes.
_maps = st.dictionaries(st.text(max_size=6), st.integers(-(2**63), 2**63 - 1), max_size=16).map(msgpack.packb)
_fields = st.tuples(
    st.sampled_from(["query", "result", "result", SESSION_START, "checkpoint", "quer\u00e9"]),
    st.one_of(st.none(), st.sampled_from(["s1", "s2", ""]), st.text(max_size=40)),
    st.integers(0, 2**64 - 1),
    st.one_of(st.binary(max_size=300), _maps),
).flatmap(lambda r: st.one_of(st.just(r), st.booleans().map(lambda joins: (*r, joins))))


def _frame(records: list[Any]) -> bytes:
    body: bytes = msgpack.packb(["b", [list(r) for r in records]], use_bin_type=True)
    return body


def _twin(body: bytes) -> Any:
    return audit_log._batch_items_py(body, _TYPES)


@settings(max_examples=examples(1000), deadline=None)
@given(st.lists(_fields, max_size=40))
def test_batch_frames_read_as_python_reads_them(records: list[Any]) -> None:
    body = _frame(records)
    expected = audit_log.joined_items(records) if all(r[0] in _TYPES for r in records) else None
    assert _twin(body) == expected
    assert native("batch_items")(body, _TYPES) == expected
    if expected is not None and not any(r[4:] == (True,) for r in records):
        assert expected == [(*r[:4], None) for r in records]


def _query(n: int) -> bytes:
    data: bytes = msgpack.packb({"text": f"SELECT {n}"})
    return data


def _result(n: int) -> bytes:
    data: bytes = msgpack.packb({"rows": n})
    return data


@pytest.mark.parametrize("read", ["native", "python"])
def test_a_result_that_joins_becomes_part_of_its_sessions_last_query(read: str) -> None:
    """A result marked as answering its session's last query record is stored in that
    record when the record is in the same frame, is a query, has no result yet and is near
    enough; in every other case it stays a record of its own, and nothing is lost."""
    batch_items = native("batch_items") if read == "native" else audit_log._batch_items_py
    types = frozenset({"query", "result", "session.end"})

    def read_back(*records: tuple[Any, ...]) -> list[tuple[str, str | None, dict[str, Any]]]:
        items = batch_items(_frame(list(records)), types)
        assert items is not None
        return [(t, sid, msgpack.unpackb(data)) for t, sid, _, data, _ in items]

    q1, q2, r1, r2 = _query(1), _query(2), _result(1), _result(2)
    joined = ("query", "s1", {"text": "SELECT 1", "result": {"rows": 1}})
    assert read_back(("query", "s1", 5, q1), ("result", "s1", 6, r1, True)) == [joined]
    # Another session's records in between do not matter.
    assert read_back(("query", "s1", 5, q1), ("query", "s2", 5, q2), ("result", "s1", 6, r1, True)) \
        == [joined, ("query", "s2", {"text": "SELECT 2"})]
    apart = [("query", "s1", {"text": "SELECT 1"}), ("result", "s1", {"rows": 1})]
    # Not marked, or marked false: apart.
    assert read_back(("query", "s1", 5, q1), ("result", "s1", 6, r1)) == apart
    assert read_back(("query", "s1", 5, q1), ("result", "s1", 6, r1, False)) == apart
    # The query in an earlier frame: the result alone.
    assert read_back(("result", "s1", 6, r1, True)) == [("result", "s1", {"rows": 1})]
    # The session's last record is not a query, or the query has its result already.
    assert read_back(("query", "s1", 5, q1), ("session.end", "s1", 6, r2), ("result", "s1", 7, r1, True)) \
        == [apart[0], ("session.end", "s1", {"rows": 2}), apart[1]]
    assert read_back(("query", "s1", 5, q1), ("result", "s1", 6, r1, True), ("result", "s1", 7, r2, True)) \
        == [joined, ("result", "s1", {"rows": 2})]
    # A session id of None is a session too; "" is another one.
    assert read_back(("query", None, 5, q1), ("result", "", 6, r1, True)) == \
        [("query", None, {"text": "SELECT 1"}), ("result", "", {"rows": 1})]
    # Events that are not small maps stay apart.
    wide = msgpack.packb({f"k{i}": i for i in range(15)})
    assert len(read_back(("query", "s1", 5, wide), ("result", "s1", 6, r1, True))) == 2
    assert len(read_back(("query", "s1", 5, q1), ("result", "s1", 6, b"\x01", True))) == 2
    # Further back than JOIN_LOOKBACK records: apart.
    between = [("query", "s2", 5, q2)] * audit_log.JOIN_LOOKBACK
    assert len(read_back(("query", "s1", 5, q1), *between, ("result", "s1", 6, r1, True))) == \
        audit_log.JOIN_LOOKBACK + 2
    assert len(read_back(("query", "s1", 5, q1), *between[1:], ("result", "s1", 6, r1, True))) == \
        audit_log.JOIN_LOOKBACK


@settings(max_examples=examples(2000), deadline=None)
@given(st.lists(_fields, min_size=1, max_size=8), st.data())
def test_damaged_batch_frames_read_as_python_reads_them(records: list[Any], data: st.DataObject) -> None:
    body = bytearray(_frame(records))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "add"]))
        at = data.draw(st.integers(0, len(body) - 1)) if body else 0
        if action == "flip" and body:
            body[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del body[at:]
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    assert native("batch_items")(bytes(body), _TYPES) == _twin(bytes(body))


def test_batch_frames_of_other_kinds_are_left_to_the_general_reading() -> None:
    batch_items = native("batch_items")
    good = ["query", "s", 1, b"x"]
    for body in (
        msgpack.packb(["d", 1, "query", "s", 1, b"x"]),  # a strict record
        msgpack.packb(["b", [good]]) + b"\x00",  # bytes left over
        msgpack.packb(["b", [["query", "s", 1, "text, not bin"]]], use_bin_type=True),
        msgpack.packb(["b", [["query", "s", -1, b"x"]]], use_bin_type=True),
        msgpack.packb(["b", [["query", 7, 1, b"x"]]], use_bin_type=True),
        msgpack.packb(["b", [good + [None]]], use_bin_type=True),
        msgpack.packb(["b", [good + [True, True]]], use_bin_type=True),
        b"\x92\xa1b\x91\x94\xa5query\xa1\xff\x01\xc4\x00",  # a session id that is not UTF-8
    ):
        assert batch_items(body, _TYPES) is None
        assert _twin(body) is None
    with pytest.raises(TypeError):
        batch_items(b"", ["query"])


_events = st.one_of(
    st.binary(max_size=300),  # already encoded
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=40),
                                                   st.none(), st.booleans(), st.floats(allow_nan=False)),
                    max_size=6),
)
_records = st.tuples(
    st.sampled_from(["query", "result", "quer\u00e9"]),
    st.one_of(st.none(), st.text(max_size=40)),
    st.integers(0, 2**64 - 1),
    _events,
).flatmap(lambda r: st.one_of(st.just(r), st.just((*r, True))))


@settings(max_examples=examples(1000), deadline=None)
@given(st.lists(_records, max_size=40))
def test_batch_frames_written_as_python_writes_them(records: list[Any]) -> None:
    """The frame is msgpack's own encoding of the records, and the writer reads it back."""
    pack = msgpack.Packer(use_bin_type=True).pack
    body = native("batch_frame")(records, pack)
    assert body == audit_log._batch_frame_py(records, pack)
    packed = [(t, s, ts, e if isinstance(e, bytes) else pack(e), *rest) for t, s, ts, e, *rest in records]
    assert msgpack.unpackb(body) == ["b", [list(r) for r in packed]]
    assert audit_log._batch_items_py(body, frozenset({"query", "result", "quer\u00e9"})) == \
        audit_log.joined_items(packed)


def test_batch_frame_raises_what_it_cannot_write() -> None:
    """The agent then writes the batch record by record (and says which record)."""
    batch_frame = native("batch_frame")
    pack = msgpack.Packer(use_bin_type=True).pack
    for records in ([("query", None, 1, {"x": object()})], [("query", None, -1, b"")],
                    [("query", 5, 1, b"")], [("query", None, 1)], [("result", None, 1, b"", False)]):
        with pytest.raises((TypeError, OverflowError)):
            batch_frame(records, pack)
    assert batch_frame([], pack) == b"\x92\xa1b\x90"
