"""A session told as its user lived it: who connected, each statement, its result, decisions, timings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from audit.schema import Record, statement_result


def _who(ev: Any) -> str:
    proc = ev.get("process") or {}
    target = ev.get("target") or {}
    src = ev.get("source") or {}
    parts = []
    if proc:
        cmd = " ".join(proc.get("cmdline") or []) or proc.get("comm") or "?"
        parts.append(f"pid {proc.get('pid')} uid {proc.get('uid')} ({cmd})")
    if src:
        parts.append(f"from {src.get('ip')}:{src.get('port')}")
    if target:
        parts.append(f"as {target.get('user')} to {target.get('database')}")
    return " ".join(parts) or "unknown client"


def _since(ns: int) -> str:
    """The prefix of a line: the time since the session started."""
    return f"+{ns / 1e9:9.3f}s"


def _result_line(at: str, ev: Any) -> str:
    err = ev.get("error")
    tail = f" error {err.get('sqlstate')}: {err.get('message')}" if isinstance(err, dict) else ""
    return (f"{at}    -> {ev.get('outcome')} {ev.get('command_tag') or ''} "
            f"rows={ev.get('rows')} in {ev.get('duration_ms')} ms{tail}")


def replay_lines(records: Sequence[Record]) -> Iterator[str]:
    """Human-readable lines, each prefixed with the time since the session started."""
    if not records:
        return
    t0 = records[0].ts_ns
    yield f"session {records[0].session_id} on {records[0].host}, started {records[0].ts}"
    for r in records:
        ev = r.event
        at = _since(r.ts_ns - t0)
        if r.type == "session.start":
            yield f"{at}  connect  {ev.get('service')} ({ev.get('protocol')}) {_who(ev)}"
        elif r.type == "query":
            more = " [truncated]" if ev.get("truncated") else ""
            if ev.get("parameters"):
                more += f" with parameters {ev['parameters']}"
            yield f"{at}  {ev.get('protocol', '')} query: {ev.get('text')}{more}"
            result = statement_result(r.type, ev)
            if result is not None:  # (the answer came before the record was written)
                duration = result.get("duration_ms")
                ended = r.ts_ns + int(duration * 1e6) if isinstance(duration, (int, float)) else r.ts_ns
                yield _result_line(_since(ended - t0), result)
        elif r.type == "result":
            yield _result_line(at, ev)
        elif r.type == "policy.decision":
            yield (f"{at}  policy: {ev.get('effect')} {ev.get('scope') or ''} "
                   f"({ev.get('rule_id')}): {ev.get('reason')}")
        elif r.type == "approval.request":
            yield f"{at}  approval requested {ev.get('request_id')}: {ev.get('reason')}"
        elif r.type == "approval.decision":
            yield f"{at}  approval {ev.get('outcome')} by {ev.get('approver')}"
        elif r.type == "session.end":
            yield (
                f"{at}  end  {ev.get('reason')} ({ev.get('outcome')}), {ev.get('statements')} "
                f"statement(s), {ev.get('bytes_from_client')} B in / "
                f"{ev.get('bytes_from_server')} B out, {ev.get('duration_ms')} ms"
            )
        else:
            yield f"{at}  {r.type}"
