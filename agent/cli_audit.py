"""``ringfence audit``: read, verify and export the audit trail."""

from __future__ import annotations

import click


@click.group()
def audit() -> None:
    """Read, verify and export the audit trail."""
