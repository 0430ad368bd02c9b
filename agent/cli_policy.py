"""``ringfence policy``: validate a policy, explain a decision, run its decision table."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from policy import Policy, PolicyError, Subject, load_policy
from policy.loader import DEFAULT_POLICY_PATH
from policy.table import load_table, on_connection, parse_resource, run_table, table_for


def _load(path: str | Path) -> Policy:
    try:
        return load_policy(path)
    except PolicyError as e:
        click.echo(f"ringfence: policy error: {e}", err=True)
        sys.exit(2)


def _configured_policy_path(config_path: str | None) -> Path:
    """The agent config's [policy] path; the default when no config file exists."""
    from agent.config import ConfigError, load_config, resolve_config_path

    resolved = resolve_config_path(config_path)
    if config_path is None and not resolved.exists():
        return DEFAULT_POLICY_PATH
    try:
        return load_config(resolved).policy.path
    except ConfigError as e:
        click.echo(f"ringfence: config error: {e}", err=True)
        sys.exit(2)


@click.group()
def policy() -> None:
    """Validate, explain and test the access policy."""


@policy.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def policy_check(file: str) -> None:
    """Validate FILE; print its version or the error with file:line:column."""
    p = _load(file)
    click.echo(f"{file}: ok, {len(p.rules)} rule(s), version {p.version}")


@policy.command("explain")
@click.option("--policy", "policy_path", metavar="FILE", help="Policy file (default: the config's).")
@click.option("--config", "config_path", metavar="PATH", envvar="RINGFENCE_CONFIG")
@click.option("--subject", help="Token subject (implies an identified client).")
@click.option("--groups", multiple=True, help="Groups, comma-separated or repeated.")
@click.option("--issuer")
@click.option("--service-account")
@click.option("--actor", type=click.Choice(["human", "automation"]))
@click.option("--finding", "findings", multiple=True, help="Impersonation finding kind.")
@click.option("--unix-user")
@click.option("--loginuid-user")
@click.option("--uid", type=int)
@click.option("--loginuid", type=int)
@click.option(
    "--identified/--unidentified",
    default=None,
    help="Whether a verified identity speaks for the client (default: with --subject or --service-account).",
)
@click.option("--resource", required=True, help="service or service/database.")
@click.option("--sql", help="Statement(s) to judge; without it the connection is judged.")
@click.option("--replication", is_flag=True,
              help="The statement comes on a replication connection (replication commands).")
@click.option("--at", "at", help="Time of the decision (RFC 3339; default now).")
def policy_explain(
    policy_path: str | None,
    config_path: str | None,
    subject: str | None,
    groups: tuple[str, ...],
    issuer: str | None,
    service_account: str | None,
    actor: str | None,
    findings: tuple[str, ...],
    unix_user: str | None,
    loginuid_user: str | None,
    uid: int | None,
    loginuid: int | None,
    identified: bool | None,
    resource: str,
    sql: str | None,
    replication: bool,
    at: str | None,
) -> None:
    """Show which rule decides a connection (and statement) and why."""
    p = _load(policy_path or _configured_policy_path(config_path))
    now = datetime.now(UTC)
    if at is not None:
        try:
            now = datetime.fromisoformat(at)
        except ValueError:
            raise click.BadParameter(f"{at!r} is not an RFC 3339 time", param_hint="--at") from None
    who = Subject(
        subject=subject,
        groups=tuple(g.strip() for item in groups for g in item.split(",") if g.strip()),
        issuer=issuer,
        service_account=service_account,
        actor=actor,
        findings=findings,
        unix_user=unix_user,
        loginuid_user=loginuid_user,
        uid=uid,
        loginuid=loginuid,
        identified=identified if identified is not None else bool(subject or service_account),
    )
    statement = None if sql is None else on_connection(sql, replication)
    for line in p.explain(who, parse_resource(resource), statement, now):
        click.echo(line)


@policy.command("test")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--table", "table_path", metavar="PATH", help="Decision table (default: beside FILE).")
def policy_test(file: str, table_path: str | None) -> None:
    """Run the decision table kept beside the policy FILE (policy.tests.toml).

    FILE may also be the table itself; its `policy` key names the policy.
    """
    path = Path(file)
    try:
        if table_path is not None:
            table = load_table(table_path, policy_path=path)
        elif path.name.endswith(".tests.toml"):
            table = load_table(path)
        else:
            table = load_table(table_for(path), policy_path=path)
    except PolicyError as e:
        click.echo(f"ringfence: decision table error: {e}", err=True)
        sys.exit(2)
    p = _load(table.policy_path)
    results = run_table(p, table)
    failed = 0
    for r in results:
        if r.passed:
            click.echo(f"ok    {r.case.name}")
            continue
        failed += 1
        click.echo(f"FAIL  {r.case.name} ({table.path}:{r.case.line}): {'; '.join(r.problems)}")
    click.echo(
        f"{len(results) - failed} passed, {failed} failed ({table.policy_path}, version {p.version[:12]})"
    )
    sys.exit(1 if failed else 0)
