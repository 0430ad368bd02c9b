"""Reading the audit trail: records from a seq, the last N, a session, and following new ones.

Every read is a short LMDB read transaction (at most ``store.READ_BATCH``
records), so readers never pin old pages while the writer keeps appending.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from audit.errors import StoreCorrupt
from audit.schema import SESSION_END, Record
from audit.store import Store

POLL_SECONDS = 0.01


def open_store(path: Path) -> Store:
    """Open the audit directory for reading; raises StoreCorrupt if there is none."""
    store = Store(path)
    if not store.segments:
        store.close()
        raise StoreCorrupt(f"{path}: no audit trail here")
    return store


def records(store: Store, start: int = 0) -> Iterator[Record]:
    """Committed records from ``start`` (or the first seq held) onwards."""
    yield from store.iter_records(max(start, store.first_seq))


def last(store: Store, count: int) -> list[Record]:
    """The last ``count`` committed records, oldest first."""
    end = store.next_seq()
    return list(store.iter_records(max(store.first_seq, end - count), end))


def follow(
    store: Store,
    start: int,
    *,
    poll: float = POLL_SECONDS,
    stop: Callable[[], bool] | None = None,
) -> Iterator[Record]:
    """Records from ``start`` forever (until ``stop()``), polling for new commits every ``poll`` s."""
    pos = start
    while stop is None or not stop():
        got = False
        for record in store.iter_records(pos):
            got = True
            pos = record.seq + 1
            yield record
        if not got:
            if pos >= store.next_seq():
                store.refresh()
            time.sleep(poll)


def session(store: Store, session_id: str) -> list[Record]:
    """Every record of one session, from its session.start (or the first held) to its end."""
    start = store.session_start(session_id)
    if start is None:
        start = store.first_seq
    out: list[Record] = []
    for record in store.iter_records(start):
        if record.session_id != session_id:
            continue
        out.append(record)
        if record.type == SESSION_END:
            break
    return out
