"""The audit trail written by a child process: same records, same durability, clear failures."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from pathlib import Path

import msgpack
import pytest

import audit.process
from agent.config import AuditSettings
from audit.checkpoint import Signer
from audit.errors import AuditUnavailable, UnknownEventType
from audit.process import AuditProcess
from audit.store import Store
from audit.verify import verify


def settings(tmp_path: Path) -> AuditSettings:
    return AuditSettings(path=tmp_path / "audit", key_path=tmp_path / "state" / "audit.key",
                         batch_max_delay_ms=1.0)


def start(tmp_path: Path, lock_timeout: float = 30.0) -> AuditProcess:
    return AuditProcess.start(settings(tmp_path), host="test.host", state_dir=tmp_path / "state",
                              lock_timeout=lock_timeout)


def read_types(tmp_path: Path) -> list[tuple[str, str | None, dict[str, object]]]:
    with Store(tmp_path / "audit") as store:
        return [(r.type, r.session_id, r.event) for r in store.iter_records() if r.type != "checkpoint"]


def test_records_from_the_loop_and_from_threads_keep_their_order_and_verify(tmp_path: Path) -> None:
    """Batched records sent once per loop turn, a strict one in between, and one from outside the
    loop all land in the order they were emitted, and the whole trail verifies."""
    trail = start(tmp_path)

    async def session() -> int:
        trail.emit("session.start", {"n": 0}, session_id="s1")
        trail.emit("query", {"n": 1}, session_id="s1")
        seq = await trail.emit_durable("policy.decision", {"n": 2}, session_id="s1")
        trail.emit("result", {"n": 3}, session_id="s1")
        await asyncio.sleep(0)
        trail.emit("session.end", {"n": 4}, session_id="s1")
        return seq

    seq = asyncio.run(session())
    trail.emit("agent.stop", {"n": 5})
    assert trail.flush(timeout=30)
    trail.close()
    records = read_types(tmp_path)
    assert [event["n"] for _, _, event in records] == [0, 1, 2, 3, 4, 5]
    assert records[2][0] == "policy.decision" and seq == 2
    signer = Signer.parse((tmp_path / "state" / "audit.key").read_text())
    with Store(tmp_path / "audit") as store:
        report = verify(store, signer.verifier)
    assert report.problem is None and report.records >= 6


@pytest.mark.parametrize("count", [15, 16, 65_535, 65_536])
def test_a_loop_turn_of_any_size_arrives_whole_and_in_order(tmp_path: Path, count: int) -> None:
    """All records emitted in one loop turn travel as one batch, whatever its size (the batch's
    header changes form at 16 and at 65,536 records): none lost, none reordered."""
    trail = start(tmp_path)

    async def turn() -> None:
        for n in range(count):
            trail.emit("query", {"n": n}, session_id="s1")

    asyncio.run(turn())
    assert trail.flush(timeout=120)
    trail.close()
    assert [event["n"] for _, _, event in read_types(tmp_path)] == list(range(count))


def test_batched_records_reach_the_trail_without_a_flush_from_each_loop(tmp_path: Path) -> None:
    """Records from the event loop go to the writer shortly after, on their own: also when an
    earlier loop ended before its send was due (that record goes with the next loop's)."""
    trail = start(tmp_path)

    async def first() -> None:
        trail.emit("query", {"n": 0}, session_id="s1")

    async def second() -> list[int]:
        trail.emit("query", {"n": 1}, session_id="s1")
        seen: list[int] = []
        for _ in range(200):
            await asyncio.sleep(0.05)
            seen = [event["n"] for _, _, event in read_types(tmp_path)]
            if len(seen) == 2:
                break
        return seen

    asyncio.run(first())
    try:
        assert asyncio.run(second()) == [0, 1]
    finally:
        trail.close()


def test_a_busy_loop_sends_its_batch_with_the_first_record_after_the_send_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch goes to the writer with the loop turn that emits a record SEND_DELAY_NS after
    the batch began, without waiting for the timer meant for a batch no record follows."""
    # That timer pushed far off: on a loaded machine the sleep below can take longer than
    # SEND_AT_THE_LATEST, and the timer would then send the first record by itself.
    monkeypatch.setattr(audit.process, "SEND_AT_THE_LATEST", 60.0)
    trail = start(tmp_path)

    async def busy() -> int:
        trail.emit("query", {"n": 0}, session_id="s1")
        await asyncio.sleep(audit.process.SEND_DELAY_NS * 1.5e-9)
        trail.emit("result", {"n": 1}, session_id="s1")
        await asyncio.sleep(0)  # the turn after the emit
        return len(trail._unencoded)

    try:
        assert asyncio.run(busy()) == 0  # nothing left unsent
        assert trail.flush(timeout=30)
    finally:
        trail.close()
    assert [event["n"] for _, _, event in read_types(tmp_path)] == [0, 1]


def test_values_msgpack_cannot_encode_are_recorded_as_text(tmp_path: Path) -> None:
    """A record holding a lone surrogate, an integer too big for msgpack or an object of no
    msgpack type is still written, those values as text; its neighbours are untouched."""
    trail = start(tmp_path)
    odd = {"text": "x\ud800y", "big": 1 << 70, "things": [frozenset({1})], "n": 1}

    async def loop() -> None:
        trail.emit("query", {"n": 0}, session_id="s1")
        trail.emit("query", odd, session_id="s1")
        trail.emit("query", {"n": 2}, session_id="s1")
        # A statement joined in the same batch (written record by record) stays joined.
        trail.emit_packed("query", msgpack.packb({"n": 5}), "s2", asyncio.get_running_loop())
        trail.emit_packed("result", msgpack.packb({"rows": 6}), "s2", asyncio.get_running_loop(), True)

    asyncio.run(loop())
    trail.emit("result", odd, session_id="s1")  # outside the loop
    assert trail.flush(timeout=30)
    trail.close()
    records = read_types(tmp_path)
    assert [event["n"] for _, _, event in records] == [0, 1, 2, 5, 1]
    assert records[3][2]["result"] == {"rows": 6}
    del records[3]
    for _, _, event in (records[1], records[3]):
        assert event["text"] == "x\\ud800y"
        assert event["big"] == str(1 << 70)
        assert event["things"] == ["frozenset({1})"]


def test_records_emitted_together_land_in_order_and_a_bad_type_queues_none(
    tmp_path: Path,
) -> None:
    """emit_many (how the proxy hands over a message's records) keeps their order, from the loop
    and from a thread alike; one type producers may not emit refuses the whole call."""
    trail = start(tmp_path)

    async def loop() -> None:
        trail.emit_many([("query", {"n": 0}), ("result", {"n": 1, "odd": frozenset()}),
                         ("query", {"n": 2})], session_id="s1")
        with pytest.raises(UnknownEventType):
            trail.emit_many([("query", {"n": -1}), ("checkpoint", {"n": -2})], session_id="s1")

    asyncio.run(loop())
    trail.emit_many([("result", {"n": 3}), ("session.end", {"n": 4})], session_id="s1")
    assert trail.flush(timeout=30)
    trail.close()
    records = read_types(tmp_path)
    assert [(kind, event["n"]) for kind, _, event in records] == [
        ("query", 0), ("result", 1), ("query", 2), ("result", 3), ("session.end", 4)]
    assert records[1][2]["odd"] == "frozenset()"


def test_records_sent_before_the_agent_dies_are_committed(tmp_path: Path) -> None:
    """The agent's end of the socket closes without a goodbye (kill -9): the writer commits
    what it received, then exits."""
    trail = start(tmp_path)
    for n in range(200):
        trail.emit("query", {"n": n}, session_id="s1")
    trail._sock.shutdown(socket.SHUT_RDWR)  # what the kernel does for a killed agent
    trail._sock.close()
    assert trail._process.wait(timeout=60) == 0
    assert [event["n"] for _, _, event in read_types(tmp_path)] == list(range(200))


def reply_thread_wakeups(trail: AuditProcess) -> int:
    thread = trail._reader
    assert thread.native_id is not None
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_the_reply_reader_sleeps_while_the_writer_drains_frames(tmp_path: Path) -> None:
    """The thread that reads the writer's replies wakes for replies, not each time the writer
    reads a frame the agent sent (hundreds a second under load, each a context switch)."""
    trail = start(tmp_path)
    assert trail.flush(timeout=30)
    before = reply_thread_wakeups(trail)
    for n in range(300):
        trail.emit("query", {"n": n}, session_id="s1")  # outside a loop: one frame each
        time.sleep(0.0005)  # the writer drains each frame on its own
    assert trail.flush(timeout=30)  # one reply
    wakeups = reply_thread_wakeups(trail) - before
    trail.close()
    assert [event["n"] for _, _, event in read_types(tmp_path)] == list(range(300))
    assert wakeups < 30


def test_a_dead_writer_makes_the_trail_unavailable(tmp_path: Path) -> None:
    """Without its writer the trail says so: unhealthy, emits refused, strict records fail."""
    trail = start(tmp_path)
    os.kill(trail._process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while trail.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not trail.healthy
    assert "audit writer process ended" in (trail.failure or "")
    with pytest.raises(AuditUnavailable):
        trail.emit("query", {"n": 1}, session_id="s1")
    with pytest.raises(AuditUnavailable):
        trail.emit_durable_sync("policy.decision", {"n": 2}, session_id="s1")
    assert not trail.flush(timeout=5)
    trail.close()


def test_a_second_writer_waits_for_the_first_then_refuses(tmp_path: Path) -> None:
    """Two writers never append to one store: the second names the lock it could not take."""
    first = start(tmp_path)
    with pytest.raises(RuntimeError, match="another audit writer holds"):
        start(tmp_path, lock_timeout=0.5)
    first.emit("agent.stop", {"n": 1})
    first.close()
    second = start(tmp_path)
    second.emit("agent.stop", {"n": 2})
    second.close()
    assert [event["n"] for _, _, event in read_types(tmp_path)] == [1, 2]


def test_a_store_that_cannot_be_opened_is_reported_at_start(tmp_path: Path) -> None:
    """A store path that is a file gives a start error naming the path."""
    (tmp_path / "audit").write_text("not a store")
    with pytest.raises(RuntimeError, match="audit trail at"):
        start(tmp_path)


def test_events_already_encoded_are_stored_as_they_are(tmp_path: Path) -> None:
    """emit_packed (the one-step paths' records, encoded by the session) from the loop, with
    or without the caller's loop named (a wrong one is not trusted), and the same from a
    thread or after a loop ended, land in order beside ordinary events; a type producers
    may not emit is refused as emit's is."""
    import msgpack

    trail = start(tmp_path)

    def packed(n: int) -> bytes:
        data: bytes = msgpack.packb({"n": n, "encoded": True})
        return data

    async def loop(first: int) -> None:
        trail.emit_packed("query", packed(first), "s1")  # the loop not yet known: emit_many
        trail.emit("result", {"n": first + 1}, session_id="s1")
        trail.emit_packed("query", packed(first + 2), "s1")
        trail.emit_packed("result", packed(first + 3), "s1", asyncio.get_running_loop())
        other = asyncio.new_event_loop()  # named as the caller, but not this trail's loop
        try:
            trail.emit_packed("query", packed(first + 4), "s1", other)
        finally:
            other.close()
        with pytest.raises(UnknownEventType):
            trail.emit_packed("checkpoint", packed(-1), "s1")

    asyncio.run(loop(0))
    asyncio.run(loop(5))  # a new loop on the same thread
    trail.emit_packed("result", packed(10), "s1")  # outside any loop
    assert trail.flush(timeout=30)
    trail.close()
    records = read_types(tmp_path)
    assert [event["n"] for _, _, event in records] == list(range(11))
    assert [event.get("encoded", False) for _, _, event in records] == [
        True, False, True, True, True] * 2 + [True]
    assert {sid for _, sid, _ in records} == {"s1"}


def test_a_result_joins_its_query_record_while_that_waits_for_its_batch(tmp_path: Path) -> None:
    """emit_packed(joins=True): a result that answers its session's last query record (emit_packed), while
    that record still waits in the agent, is stored in it (one record for the statement);
    once the query record has gone to the writer, or when the result is not said to answer
    it, the result is a record of its own. Every statement keeps exactly one result, in
    order, and the trail verifies."""
    trail = start(tmp_path)

    def query(n: int) -> bytes:
        data: bytes = msgpack.packb({"text": f"SELECT {n}", "length": 8})
        return data

    def result(n: int) -> bytes:
        data: bytes = msgpack.packb({"rows": n, "outcome": "success"})
        return data

    async def session() -> None:
        loop = asyncio.get_running_loop()
        trail.emit("session.start", {}, session_id="s1")
        trail.emit_packed("query", query(1), "s1", loop)
        trail.emit_packed("result", result(1), "s1", loop, True)  # joins its query
        trail.emit_packed("query", query(2), "s1", loop)
        assert trail.flush(timeout=30)  # the batch holding the query goes to the writer
        trail.emit_packed("result", result(2), "s1", loop, True)  # its own record
        trail.emit_packed("query", query(3), "s1", loop)
        trail.emit_packed("query", query(4), "s2", loop)  # another session's, in between
        trail.emit_packed("result", result(3), "s1", loop, True)  # still waiting: joins
        trail.emit_packed("result", result(4), "s2", loop, False)  # not said to answer it
        trail.emit("session.end", {}, session_id="s1")

    asyncio.run(session())
    trail.emit_packed("result", result(5), "s3", None, True)  # outside any loop: sent at once, alone
    assert trail.flush(timeout=30)
    trail.close()
    records = read_types(tmp_path)
    assert [(t, sid, e.get("text"), (e.get("result") or {}).get("rows"), e.get("rows"))
            for t, sid, e in records] == [
        ("session.start", "s1", None, None, None),
        ("query", "s1", "SELECT 1", 1, None),
        ("query", "s1", "SELECT 2", None, None),
        ("result", "s1", None, None, 2),
        ("query", "s1", "SELECT 3", 3, None),
        ("query", "s2", "SELECT 4", None, None),
        ("result", "s2", None, None, 4),
        ("session.end", "s1", None, None, None),
        ("result", "s3", None, None, 5),
    ]
    signer = Signer.parse((tmp_path / "state" / "audit.key").read_text())
    with Store(tmp_path / "audit") as store:
        report = verify(store, signer.verifier)
    assert report.problem is None


def test_with_result_joins_small_maps_only() -> None:
    """The query event gains one field, ``result``, holding the result event as it was
    encoded; an event too large for a one-byte map header is left to a record of its own."""
    from audit.schema import statement_result, with_result

    query = msgpack.packb({"text": "SELECT 1", "length": 8, "policy": {"effect": "allow"}})
    result = msgpack.packb({"rows": 1, "outcome": "success", "commands": ["SELECT 1"]})
    joined = with_result(query, result)
    assert joined is not None
    event = msgpack.unpackb(joined)
    assert event == {"text": "SELECT 1", "length": 8, "policy": {"effect": "allow"},
                     "result": {"rows": 1, "outcome": "success", "commands": ["SELECT 1"]}}
    assert statement_result("query", event) == event["result"]
    assert statement_result("query", msgpack.unpackb(query)) is None
    assert statement_result("result", {"rows": 2}) == {"rows": 2}
    wide = msgpack.packb({f"k{i}": i for i in range(15)})
    assert with_result(wide, result) is None
    assert with_result(query, msgpack.packb([1, 2])) is None


def test_further_producers_share_the_trail_and_the_writer_waits_for_them(tmp_path: Path) -> None:
    """A session worker's producer (attach) writes into the same trail: its batched, strict and
    flushed records land, each producer's in its order, the chain verifies, and the agent's
    close waits until the worker has closed, so nothing the worker sent is lost."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    trail = AuditProcess.start(settings(tmp_path), host="test.host", state_dir=tmp_path / "state",
                               lock_timeout=30.0, producers=[theirs])
    assert theirs.fileno() == -1  # handed to the writer
    worker = AuditProcess.attach(ours)

    async def session() -> int:
        for n in range(3):
            worker.emit("query", {"w": n}, session_id="w1")
        return await worker.emit_durable("policy.decision", {"w": 3}, session_id="w1")

    seq = asyncio.run(session())
    trail.emit("agent.start", {"a": 0})
    worker.emit("query", {"w": 4}, session_id="w1")  # from outside a loop: sent at once
    assert worker.flush(timeout=30)
    assert worker.healthy

    closed = []
    closer = threading.Thread(target=lambda: (trail.close(), closed.append(True)))
    closer.start()
    time.sleep(0.5)
    assert not closed  # the writer waits for the worker's producer
    worker.emit("session.end", {"w": 5}, session_id="w1")
    worker.close()
    closer.join(60)
    assert closed
    records = read_types(tmp_path)
    assert [e["w"] for _, _, e in records if "w" in e] == [0, 1, 2, 3, 4, 5]
    assert [e for t, _, e in records if t == "agent.start"] == [{"a": 0}]
    assert seq == 3  # the fourth record of the trail (seq counts from 0)
    signer = Signer.parse((tmp_path / "state" / "audit.key").read_text())
    with Store(tmp_path / "audit") as store:
        assert verify(store, signer.verifier).problem is None


def test_a_producer_that_closes_is_not_told_the_writer_went(tmp_path: Path) -> None:
    """A session worker's orderly close: the writer takes its close frame and closes its end,
    which the producer's reader sees as soon as the frame is out, even while close() is still
    under way; the worker must not take that for the writer gone (it would exit as failed)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    trail = AuditProcess.start(settings(tmp_path), host="test.host", state_dir=tmp_path / "state",
                               lock_timeout=30.0, producers=[theirs])
    worker = AuditProcess.attach(ours)
    gone: list[str] = []
    worker.on_gone = gone.append
    send = worker._send_frame

    def send_then_wait(body: bytes | bytearray) -> None:
        send(body)
        if msgpack.unpackb(body) == ["c"]:
            time.sleep(0.5)  # the writer answers the close frame meanwhile

    worker._send_frame = send_then_wait  # type: ignore[method-assign]
    worker.emit("query", {"n": 1}, session_id="w1")
    worker.close()
    trail.close()
    assert gone == []
    assert [e["n"] for _, _, e in read_types(tmp_path) if "n" in e] == [1]


def test_a_producer_sees_the_writer_go(tmp_path: Path) -> None:
    """When the writer dies, a session worker's producer turns unhealthy and is told, so the
    worker's sessions fail closed as the agent's do."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    trail = AuditProcess.start(settings(tmp_path), host="test.host", state_dir=tmp_path / "state",
                               lock_timeout=30.0, producers=[theirs])
    worker = AuditProcess.attach(ours)
    gone = threading.Event()
    worker.on_gone = lambda reason: gone.set()
    assert trail._process is not None
    os.kill(trail._process.pid, signal.SIGKILL)
    assert gone.wait(10)
    assert not worker.healthy
    with pytest.raises(AuditUnavailable):
        worker.emit("query", {"n": 1}, session_id="w1")
    trail.close()
    worker.close()


@pytest.mark.parametrize("piece", [1, 3, 7, 4096, 1 << 20])
def test_frames_arrive_whole_however_the_stream_is_cut(piece: int) -> None:
    """The writer reads a producer's stream in large pieces: frames cut anywhere, several in
    one read, one larger than its buffer, and a stream ending mid-frame."""
    bodies = [b"", b"x" * 5, os.urandom(70_000), b"y", os.urandom(audit.process._FRAME_BUFFER * 2 + 3),
              *(os.urandom(n) for n in range(1, 300, 37)), b"last"]
    stream = b"".join(len(b).to_bytes(4, "big") + b for b in bodies) + (9).to_bytes(4, "big") + b"cut"
    ours, theirs = socket.socketpair()

    def send() -> None:
        for at in range(0, len(stream), piece):
            theirs.sendall(stream[at:at + piece])
        theirs.close()

    sender = threading.Thread(target=send)
    sender.start()
    frames = audit.process._Frames(ours)
    received = []
    while (body := frames.next()) is not None:
        received.append(bytes(body))
    sender.join()
    ours.close()
    assert received == bodies
