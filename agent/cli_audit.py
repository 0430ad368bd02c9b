"""``ringfence audit``: read, verify and export the audit trail."""

from __future__ import annotations

import collections
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from agent.cli_options import config_option
from audit.checkpoint import Verifier
from audit.errors import AuditError
from audit.schema import Record, statement_result
from audit.store import Store


class AuditContext:
    """Where the audit trail and its key are, from --path/--key-path or the configuration."""

    def __init__(self, path: str | None, key_path: str | None, config_path: str | None) -> None:
        self._path = Path(path) if path else None
        self._key_path = Path(key_path) if key_path else None
        self.config_path = config_path

    def _config(self) -> object:
        from agent.cli_options import load_or_exit

        return load_or_exit(self.config_path)

    @property
    def path(self) -> Path:
        """The audit directory."""
        if self._path is None:
            from agent.config import Config

            cfg = self._config()
            assert isinstance(cfg, Config)
            self._path = cfg.audit.path
        return self._path

    @property
    def key_path(self) -> Path:
        """The checkpoint signing key."""
        if self._key_path is None:
            from agent.config import Config

            cfg = self._config()
            assert isinstance(cfg, Config)
            self._key_path = cfg.audit.key_path or cfg.agent.state_dir / "audit.key"
        return self._key_path

    def store(self) -> Store:
        """The store opened for reading, or exit 2 with the reason."""
        from audit.reader import open_store

        try:
            return open_store(self.path)
        except AuditError as e:
            fail(str(e), 2)
            raise AssertionError("unreachable") from None


def fail(message: str, code: int = 1) -> None:
    """Print an error and exit."""
    click.echo(f"ringfence audit: {message}", err=True)
    sys.exit(code)


def render(record: Record, as_json: bool) -> str:
    """One record as a line of text or a JSON object."""
    if as_json:
        return json.dumps(record.to_json(), separators=(",", ":"), ensure_ascii=False)
    sid = f" {record.session_id}#{record.index}" if record.session_id is not None else ""
    fields = " ".join(
        f"{k}={json.dumps(v, ensure_ascii=False, separators=(',', ':'))}"
        for k, v in record.to_json().items()
        if k not in ("seq", "ts", "host", "type", "session_id", "index")
    )
    return f"{record.seq} {record.ts} {record.type}{sid} {fields}".rstrip()


def _filtered(records: Iterator[Record], session: str | None, types: tuple[str, ...]) -> Iterator[Record]:
    for record in records:
        if session is not None and record.session_id != session:
            continue
        if types and record.type not in types and not (
                "result" in types and statement_result(record.type, record.event) is not None):
            continue  # (a query record carrying its result counts as a result too)
        yield record


pass_ctx = click.make_pass_decorator(AuditContext)


@click.group()
@click.option("--path", "path", metavar="DIR", help="Audit directory (default: [audit] path).")
@click.option("--key-path", "key_path", metavar="FILE", help="Checkpoint key (default: [audit] key_path).")
@config_option
@click.pass_context
def audit(ctx: click.Context, path: str | None, key_path: str | None, config_path: str | None) -> None:
    """Read, verify and export the audit trail."""
    ctx.obj = AuditContext(path, key_path, config_path)


@audit.command()
@click.option("-n", "--lines", "count", default=10, show_default=True, help="Records to show first.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing records as they are committed.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--session", "session", metavar="ID", help="Only this session's records.")
@click.option("--type", "types", multiple=True, metavar="T",
              help="Only records of this type (repeatable); `result` also matches the query "
                   "records that carry their result.")
@pass_ctx
def tail(
    actx: AuditContext,
    count: int,
    follow: bool,
    as_json: bool,
    session: str | None,
    types: tuple[str, ...],
) -> None:
    """Print the last records, and with --follow every new one as it is committed."""
    from audit import reader

    with actx.store() as store:
        if session is not None or types:
            # Filters apply to the last matching records, not the last records overall.
            kept: collections.deque[Record] = collections.deque(maxlen=max(count, 0))
            kept.extend(_filtered(reader.records(store), session, types))
            matched = list(kept)
            end = store.next_seq() if not matched else matched[-1].seq + 1
        else:
            matched = reader.last(store, count) if count > 0 else []
            end = matched[-1].seq + 1 if matched else store.next_seq()
        for record in matched:
            click.echo(render(record, as_json))
        if not follow:
            return
        end = max(end, store.next_seq()) if not matched else end
        try:
            for record in _filtered(reader.follow(store, end), session, types):
                click.echo(render(record, as_json))
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


@audit.command()
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_ctx
def show(actx: AuditContext, session_id: str, as_json: bool) -> None:
    """Print every record of one session."""
    from audit import reader

    with actx.store() as store:
        records = reader.session(store, session_id)
    if not records:
        fail(f"no records for session {session_id}")
    for record in records:
        click.echo(render(record, as_json))


@audit.command()
@click.argument("session_id")
@pass_ctx
def replay(actx: AuditContext, session_id: str) -> None:
    """Replay a session as its user lived it: statements, results, decisions, timings."""
    from audit import reader
    from audit.replay import replay_lines

    with actx.store() as store:
        records = reader.session(store, session_id)
    if not records:
        fail(f"no records for session {session_id}")
    for line in replay_lines(records):
        click.echo(line)


def _verifier(actx: AuditContext, key: str | None) -> Verifier:
    from audit.checkpoint import Verifier, read_verifier

    try:
        if key is not None:
            text = Path(key).read_text() if Path(key).exists() else key
            return Verifier.parse(text)
        return read_verifier(actx.key_path)
    except (OSError, AuditError) as e:
        fail(f"cannot read the checkpoint verifier key: {e}", 2)
        raise AssertionError("unreachable") from None


key_option = click.option(
    "--key",
    "key",
    metavar="VERIFIER",
    help="Verifier key (name+id+base64) or a file holding it (default: the agent's key).",
)


@audit.command()
@click.option(
    "--witness",
    "witness",
    metavar="CHECKPOINT_FILE",
    type=click.Path(dir_okay=False),
    help="A checkpoint kept off-host (signed note or the JSONL export).",
)
@click.option("--origin", "origin", metavar="ORIGIN", help="Expected checkpoint origin.")
@key_option
@pass_ctx
def verify(actx: AuditContext, witness: str | None, origin: str | None, key: str | None) -> None:
    """Verify sequence, records, chain, tree, checkpoints (and a witness); exit 1 on a problem."""
    from audit.verify import verify as run_verify

    verifier = _verifier(actx, key)
    witness_text = None
    if witness is not None:
        try:
            witness_text = Path(witness).read_text()
        except OSError as e:
            fail(f"cannot read witness {witness}: {e.strerror or e}", 2)
    with actx.store() as store:
        report = run_verify(store, verifier, origin=origin, witness=witness_text)
    last = report.first_seq + report.records - 1
    if report.problem is not None:
        click.echo(f"FAILED {report.problem}")
        click.echo(
            f"checked {report.records} record(s) from seq {report.first_seq} and "
            f"{report.checkpoints} checkpoint(s) before the problem"
        )
        sys.exit(1)
    click.echo(
        f"ok: {report.records} record(s), seq {report.first_seq}..{last}, {report.checkpoints} checkpoint(s)"
    )
    if report.latest is not None:
        click.echo(f"latest checkpoint: size {report.latest.size} root {report.latest.root.hex()}")
    if report.witness is not None:
        click.echo(f"witness: size {report.witness.size} is consistent with this log")


@audit.command()
@click.argument("seq", type=int)
@click.option("--size", "size", type=int, help="Prove against the checkpoint of this tree size.")
@pass_ctx
def prove(actx: AuditContext, seq: int, size: int | None) -> None:
    """Print an inclusion proof of record SEQ against a signed checkpoint, as JSON."""
    from audit.merkle import leaf_hash
    from audit.verify import checkpoint_at_or_after, prove_inclusion

    with actx.store() as store:
        cps = store.checkpoint_seqs()
        if size is None:
            covering = [s for s, _ in cps if s > seq]
            if not covering:
                fail(f"no checkpoint covers seq {seq} yet")
            size = covering[-1]
        cp = checkpoint_at_or_after(store, size)
        if cp is None or cp.size != size:
            fail(f"no checkpoint of size {size}")
            raise AssertionError("unreachable")
        raw = store.get_raw(seq)
        if raw is None or seq >= size:
            fail(f"record {seq} is not in the tree of size {size}")
            raise AssertionError("unreachable")
        try:
            proof = prove_inclusion(store, seq, size)
        except AuditError as e:
            fail(str(e))
            raise AssertionError("unreachable") from None
    bundle = {
        "seq": seq,
        "record": raw.hex(),
        "leaf_hash": leaf_hash(raw).hex(),
        "size": size,
        "root": cp.root.hex(),
        "proof": [h.hex() for h in proof],
        "checkpoint": cp.note,
    }
    click.echo(json.dumps(bundle, indent=2))


@audit.command()
@click.argument("old", type=int)
@click.argument("new", type=int)
@pass_ctx
def consistency(actx: AuditContext, old: int, new: int) -> None:
    """Print a consistency proof between tree sizes OLD and NEW, as JSON."""
    from audit.merkle import tree_root
    from audit.verify import prove_consistency

    if old > new:
        fail(f"old size {old} is larger than new size {new}")
    with actx.store() as store:
        if new > store.next_seq():
            fail(f"the log holds {store.next_seq()} records, fewer than {new}")
        try:
            proof = prove_consistency(store, old, new)
            old_root = tree_root(old, store.read_hash)
            new_root = tree_root(new, store.read_hash)
        except AuditError as e:
            fail(str(e))
            raise AssertionError("unreachable") from None
        notes = {}
        for cp_size, cp_seq in store.checkpoint_seqs():
            if cp_size in (old, new):
                rec = store.get(cp_seq)
                if rec is not None:
                    notes[cp_size] = rec.event.get("note")
    click.echo(
        json.dumps(
            {
                "old": old,
                "new": new,
                "old_root": old_root.hex(),
                "new_root": new_root.hex(),
                "proof": [h.hex() for h in proof],
                "old_checkpoint": notes.get(old),
                "new_checkpoint": notes.get(new),
            },
            indent=2,
        )
    )


@audit.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "ocsf"]), default="jsonl", show_default=True)
@click.option("--since", "since", metavar="TIME", help="RFC 3339 time (inclusive).")
@click.option("--until", "until", metavar="TIME", help="RFC 3339 time (exclusive).")
@pass_ctx
def export(actx: AuditContext, fmt: str, since: str | None, until: str | None) -> None:
    """Write records as JSON lines or OCSF events to stdout."""
    from audit import reader
    from audit.export import in_window, to_jsonl, to_ocsf
    from audit.schema import parse_ts

    try:
        since_ns = parse_ts(since) if since else None
        until_ns = parse_ts(until) if until else None
    except ValueError as e:
        fail(f"bad time: {e}", 2)
        raise AssertionError("unreachable") from None
    with actx.store() as store:
        for record in in_window(reader.records(store), since_ns, until_ns):
            line = (
                to_jsonl(record)
                if fmt == "jsonl"
                else json.dumps(to_ocsf(record), separators=(",", ":"), ensure_ascii=False)
            )
            click.echo(line)


@audit.command()
@pass_ctx
def key(actx: AuditContext) -> None:
    """Print the verifier (public) key that checks this host's checkpoints."""
    from audit.checkpoint import read_verifier

    try:
        click.echo(read_verifier(actx.key_path).text())
    except (OSError, AuditError) as e:
        fail(f"cannot read {actx.key_path}: {e}", 2)
