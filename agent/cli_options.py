"""What every ``ringfence`` subcommand shares: the --config option and loading the config."""

from __future__ import annotations

import sys

import click

from agent.config import Config, ConfigError, load_config

config_option = click.option(
    "--config",
    "config_path",
    metavar="PATH",
    envvar="RINGFENCE_CONFIG",
    help="Configuration file (default /etc/ringfence/ringfence.toml).",
)


def load_or_exit(path: str | None) -> Config:
    """Load the configuration or exit with its error message."""
    try:
        return load_config(path)
    except ConfigError as e:
        click.echo(f"ringfence: config error: {e}", err=True)
        sys.exit(2)


def exit_while_agent_runs(action: str) -> None:
    """Exit with why, when an agent runs in this network namespace: commands that remove
    what an agent installed wait for it to stop (agent/claim.py)."""
    from agent.claim import refusal

    why = refusal(action)
    if why is not None:
        click.echo(f"ringfence: {why}", err=True)
        sys.exit(1)
