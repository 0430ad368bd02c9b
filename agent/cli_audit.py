"""``ringfence audit``: read, verify and export the audit trail."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from audit.errors import AuditError
from audit.schema import Record
from audit.store import Store


class AuditContext:
    """Where the audit trail and its key are, from --path/--key-path or the configuration."""

    def __init__(self, path: str | None, key_path: str | None, config_path: str | None) -> None:
        self._path = Path(path) if path else None
        self._key_path = Path(key_path) if key_path else None
        self.config_path = config_path

    def _config(self) -> object:
        from agent.cli import load_or_exit

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
        if types and record.type not in types:
            continue
        yield record


pass_ctx = click.make_pass_decorator(AuditContext)


@click.group()
@click.option("--path", "path", metavar="DIR", help="Audit directory (default: [audit] path).")
@click.option("--key-path", "key_path", metavar="FILE", help="Checkpoint key (default: [audit] key_path).")
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    envvar="RINGFENCE_CONFIG",
    help="Configuration file (default /etc/ringfence/ringfence.toml).",
)
@click.pass_context
def audit(ctx: click.Context, path: str | None, key_path: str | None, config_path: str | None) -> None:
    """Read, verify and export the audit trail."""
    ctx.obj = AuditContext(path, key_path, config_path)


@audit.command()
@click.option("-n", "--lines", "count", default=10, show_default=True, help="Records to show first.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing records as they are committed.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--session", "session", metavar="ID", help="Only this session's records.")
@click.option("--type", "types", multiple=True, metavar="T", help="Only records of this type (repeatable).")
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
            matched = list(_filtered(reader.records(store), session, types))[-count:] if count else []
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
