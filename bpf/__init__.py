"""BPF C sources loaded by the agent with BCC."""

from pathlib import Path


def source_path(name: str) -> Path:
    """Path of the BPF C source ``name`` shipped with the package."""
    return Path(__file__).with_name(name)
