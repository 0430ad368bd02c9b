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
