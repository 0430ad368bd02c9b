"""A 5-million-row result, and a COPY FROM STDIN sent as one 100 MB message, stream through
the agent in bounded memory."""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agent.protocols import postgres as pg
from tests.integration.clients.conftest import Host, app_name, wait_sessions
from tests.support.netns import call_in
from tests.support.pgwire import frames, until_ready

T = TypeVar("T")

ROWS = 5_000_000
QUERY = f"select g, repeat('x', 20) from generate_series(1, {ROWS}) g"
PEAK_RSS_LIMIT_KB = 150 * 1024
# What streaming may add to the agent's resident set (buffers are bounded at a few hundred KiB).
STREAM_GROWTH_LIMIT_KB = 32 * 1024


def peak_rss_kb(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def stream(pghost: Host, app: str, direct: bool) -> list[str]:
    """psql fetches the rows a million at a time (FETCH_COUNT) into cksum; returns its output."""
    psql = pghost.psql_argv("-At", "-v", "FETCH_COUNT=1000000", "-c", QUERY, direct=direct)
    _, out = pghost.run_client(["sh", "-c", '"$@" | cksum', "sh", *psql], app, timeout=600)
    return out.split()


def reset_peak_rss(pid: int) -> int:
    """Reset VmHWM to the current RSS (clear_refs 5); returns that RSS in KiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss_kb(pid)


def test_five_million_rows_stream_in_bounded_memory(pghost: Host) -> None:
    """Every row reaches psql byte-identical to a direct run, streaming them adds under 32 MB to
    the peak RSS of the agent process carrying the session (the agent or a session worker),
    and no agent process's lifetime peak reaches 150 MB."""
    app = app_name("large")
    pids = pghost.agent.session_pids()  # nsenter exec()s the agent: the first is the agent's
    direct = stream(pghost, app, direct=True)
    # BPF is compiled in a child: no LLVM in the agent.
    startup_peaks = {pid: peak_rss_kb(pid) for pid in pids}
    before = {pid: reset_peak_rss(pid) for pid in pids}
    through = stream(pghost, app, direct=False)
    assert through == direct
    assert int(through[1]) == sum(len(f"{g}|{'x' * 20}\n") for g in range(1, ROWS + 1))
    recs = wait_sessions(pghost.agent, app)[0]
    carrier = next(r for r in recs if r["type"] == "session.start")["agent_pid"]
    assert carrier in pids
    assert peak_rss_kb(carrier) - before[carrier] < STREAM_GROWTH_LIMIT_KB
    for pid in pids:
        assert max(startup_peaks[pid], peak_rss_kb(pid)) < PEAK_RSS_LIMIT_KB
    fetched = [r for r in recs if r["type"] == "result" and (r["command_tag"] or "").startswith("FETCH")]
    assert sum(r["rows"] for r in fetched) == ROWS


COPY_ROWS = 4_000_000


@functools.cache
def copy_data() -> bytes:
    return b"".join(b"%d\tsome text for row %d\n" % (n, n) for n in range(1, COPY_ROWS + 1))


def copy_in_one_message(address: str | tuple[str, int], app: str) -> list[tuple[bytes, bytes]]:
    """COPY FROM STDIN with all its data in a single CopyData message (libpq's PQputCopyData
    sends what it is given as one), then a count: the server's answers after the data."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(300)
        sock.connect(address)
        sock.sendall(pg.startup_message({"user": "postgres", "database": "postgres",
                                         "application_name": app}))
        until_ready(sock)
        sock.sendall(pg.query_message("create temp table bulk (n int, note text)"))
        until_ready(sock)
        sock.sendall(pg.query_message("copy bulk from stdin"))
        reply = b""
        while b"G" not in reply[:1]:
            reply += sock.recv(65536)
        sock.sendall(b"d" + struct.pack("!i", len(copy_data()) + 4) + copy_data())
        sock.sendall(pg.frontend_message(b"c", b""))
        answer = frames(until_ready(sock))
        sock.sendall(pg.query_message(
            "select count(*), sum(n), md5(string_agg(note, ',' order by n)) from bulk"))
        answer += frames(until_ready(sock))
        sock.sendall(pg.frontend_message(b"X", b""))
    return answer


def same_in_bounded_memory(pghost: Host, run: Callable[[bool], T]) -> T:
    """``run(direct)`` in the namespace directly, then through the agent: the same answer,
    and the peak RSS of no agent process (the agent, its session workers) grew by
    STREAM_GROWTH_LIMIT_KB or more meanwhile."""
    pids = pghost.agent.session_pids()
    direct = call_in(pghost.ns, lambda: run(True))
    before = {pid: reset_peak_rss(pid) for pid in pids}
    through = call_in(pghost.ns, lambda: run(False))
    assert through == direct
    for pid in pids:
        assert peak_rss_kb(pid) - before[pid] < STREAM_GROWTH_LIMIT_KB
    return through


def test_copy_of_one_100_mb_message_streams_in_bounded_memory(pghost: Host) -> None:
    """A CopyData larger than max_message_bytes (64 MiB) passes as it arrives, the server
    loads what it would load directly, and the agent's RSS hardly moves."""
    assert len(copy_data()) > 100_000_000
    app = app_name("bigcopy")
    socket_path = str(Path(pghost.server.sockdir) / ".s.PGSQL.5432")
    through = same_in_bounded_memory(pghost, lambda direct: copy_in_one_message(
        socket_path if direct else ("127.0.0.1", 5432), app))
    assert (b"C", b"COPY %d\x00" % COPY_ROWS) in through
    copy = next(r for r in wait_sessions(pghost.agent, app)[0]
                if r["type"] == "result" and r["command_tag"] == f"COPY {COPY_ROWS}")
    assert copy["rows"] == COPY_ROWS and copy["copy_bytes"] == len(copy_data())


BLOB_BYTES = 100_000_000


def upload_blob(conninfo: str, app: str) -> tuple[int, str]:
    """psycopg binds a 100 MB bytea in binary (one Bind message of that size), then asks the
    server what it stored."""
    import psycopg

    blob = bytes(range(256)) * (BLOB_BYTES // 256) + b"end"
    with psycopg.connect(conninfo, application_name=app, autocommit=True) as conn:
        conn.execute("create temp table blobs (b bytea)")
        conn.execute("insert into blobs values (%b)", [blob])
        row = conn.execute("select length(b), md5(b) from blobs").fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def test_a_bind_of_100_mb_streams_in_bounded_memory(pghost: Host) -> None:
    """A Bind larger than max_message_bytes (64 MiB; PostgreSQL takes up to 1 GB) passes as it
    arrives: the server stores what it stores directly, the agent's RSS hardly moves, and the
    record names the parameter's type and real length."""
    app = app_name("bigbind")
    through = same_in_bounded_memory(pghost, lambda direct: upload_blob(pghost.dsn(direct), app))
    assert through[0] == BLOB_BYTES + 3
    insert = next(r for r in wait_sessions(pghost.agent, app)[0]
                  if r["type"] == "query" and r.get("text", "").startswith("insert into blobs"))
    assert insert["parameters"] == [{"format": "binary", "type_oid": 17, "length": BLOB_BYTES + 3}]


def lo_write_blob(conninfo: str, app: str) -> tuple[int, str]:
    """libpq's lo_write of one 100 MB buffer (a single FunctionCall message of that size),
    then the server's length and md5 of the large object."""
    import ctypes
    import ctypes.util

    libpq = ctypes.CDLL(ctypes.util.find_library("pq"))
    libpq.PQconnectdb.restype = ctypes.c_void_p
    libpq.PQconnectdb.argtypes = [ctypes.c_char_p]
    libpq.PQexec.restype = ctypes.c_void_p
    libpq.PQexec.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    libpq.PQgetvalue.restype = ctypes.c_char_p
    libpq.PQgetvalue.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    libpq.PQerrorMessage.restype = ctypes.c_char_p
    libpq.PQerrorMessage.argtypes = [ctypes.c_void_p]
    for name in ("PQstatus", "PQfinish", "PQclear", "PQresultStatus"):
        getattr(libpq, name).argtypes = [ctypes.c_void_p]
    libpq.lo_creat.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libpq.lo_creat.restype = ctypes.c_uint
    libpq.lo_open.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    libpq.lo_write.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    libpq.lo_close.argtypes = [ctypes.c_void_p, ctypes.c_int]
    inv_write = 0x20000

    conn = libpq.PQconnectdb(f"{conninfo} application_name={app}".encode())
    try:
        assert libpq.PQstatus(conn) == 0, libpq.PQerrorMessage(conn)

        def query(sql: str) -> str:
            result = libpq.PQexec(conn, sql.encode())
            try:
                assert libpq.PQresultStatus(result) in (1, 2), libpq.PQerrorMessage(conn)  # OK
                value = libpq.PQgetvalue(result, 0, 0) if libpq.PQresultStatus(result) == 2 else b""
                return bytes(value or b"").decode()
            finally:
                libpq.PQclear(result)

        blob = bytes(range(256)) * (BLOB_BYTES // 256) + b"end"
        query("begin")
        oid = libpq.lo_creat(conn, inv_write)
        fd = libpq.lo_open(conn, oid, inv_write)
        written = libpq.lo_write(conn, fd, blob, len(blob))
        assert written == len(blob), libpq.PQerrorMessage(conn)
        assert libpq.lo_close(conn, fd) == 0
        answer = query(f"select length(lo_get({oid})) || ' ' || md5(lo_get({oid}))")
        query(f"select lo_unlink({oid})")
        query("commit")
    finally:
        libpq.PQfinish(conn)
    length, md5 = answer.split()
    return int(length), md5


def test_a_function_call_of_100_mb_streams_in_bounded_memory(pghost: Host) -> None:
    """lo_write of one 100 MB buffer, a FunctionCall larger than max_message_bytes, passes
    as it arrives: the large object holds what it holds directly, the agent's RSS hardly
    moves, and the call is recorded."""
    app = app_name("bigcall")
    through = same_in_bounded_memory(pghost, lambda direct: lo_write_blob(pghost.dsn(direct), app))
    assert through[0] == BLOB_BYTES + 3
    texts = [r.get("text") for r in wait_sessions(pghost.agent, app)[0] if r["type"] == "query"]
    assert "-- function call oid 955" in texts  # lowrite
