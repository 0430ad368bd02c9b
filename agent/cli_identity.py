"""``ringfence login | logout | whoami``: register a token with the agent for
this login session, drop it, or show what is registered."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from agent.cli_options import config_option
from agent.config import AgentSettings, ConfigError, load_config
from agent.identity.control import SOCKET_NAME, ControlError, control_request


def socket_path(socket_option: str | None, config_path: str | None) -> Path:
    """--socket, else ``<run_dir>/control.sock`` from the config, else the default run_dir."""
    if socket_option:
        return Path(socket_option)
    try:
        return load_config(config_path).agent.run_dir / SOCKET_NAME
    except ConfigError as e:
        if config_path:
            click.echo(f"ringfence: config error: {e}", err=True)
            sys.exit(2)
    return AgentSettings().run_dir / SOCKET_NAME


def _ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    try:
        response = control_request(path, request)
    except ControlError as e:
        click.echo(f"ringfence: {e}", err=True)
        sys.exit(3)
    if not response.get("ok"):
        click.echo(f"ringfence: {response.get('error', 'request failed')}", err=True)
        sys.exit(1)
    return response


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "?"
    left = int(ts - time.time())
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))
    return f"{stamp} (in {left // 60} min)" if left > 0 else f"{stamp} (expired)"


def _describe(registration: dict[str, Any]) -> str:
    groups = ", ".join(registration.get("groups") or []) or "-"
    return (
        f"subject  {registration.get('subject')}\n"
        f"issuer   {registration.get('issuer')}\n"
        f"groups   {groups}\n"
        f"expires  {_when(registration.get('exp'))}\n"
        f"session  uid {registration.get('uid')}, audit session {registration.get('audit_session')}"
    )


socket_option = click.option(
    "--socket",
    "socket_opt",
    metavar="PATH",
    envvar="RINGFENCE_SOCKET",
    help="The agent's control socket (default <run_dir>/control.sock).",
)


@click.command()
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE")
@click.option("--token", "token_arg", metavar="-", help="'-': read the token from stdin.")
@socket_option
@config_option
def login(
    token_file: Path | None, token_arg: str | None, socket_opt: str | None, config_path: str | None
) -> None:
    """Register a token: later connections from this uid and login session speak for it."""
    if token_arg is not None and token_arg != "-":
        raise click.UsageError(
            "--token only takes '-' (read stdin): a token on the command line is visible to "
            "other users; use --token-file FILE or --token -"
        )
    if (token_file is None) == (token_arg is None):
        raise click.UsageError("give exactly one of --token-file FILE or --token -")
    try:
        token = token_file.read_text() if token_file else sys.stdin.read()
    except (OSError, UnicodeDecodeError) as e:
        raise click.UsageError(f"cannot read the token: {e}") from None
    token = token.strip()
    if not token:
        raise click.UsageError("the token is empty")
    response = _ask(socket_path(socket_opt, config_path), {"op": "login", "token": token})
    click.echo("logged in\n" + _describe(response["registration"]))


@click.command()
@socket_option
@config_option
def logout(socket_opt: str | None, config_path: str | None) -> None:
    """Forget the token registered from this login session."""
    response = _ask(socket_path(socket_opt, config_path), {"op": "logout"})
    click.echo("logged out" if response.get("removed") else "no login registered for this session")


@click.command()
@socket_option
@config_option
def whoami(socket_opt: str | None, config_path: str | None) -> None:
    """Show the token registered for this login session, if any."""
    response = _ask(socket_path(socket_opt, config_path), {"op": "whoami"})
    registration = response.get("registration")
    if registration is None:
        click.echo(
            f"no login registered (uid {response.get('uid')}, "
            f"audit session {response.get('audit_session')}); run `ringfence login`"
        )
        return
    click.echo(_describe(registration))
