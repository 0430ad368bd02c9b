"""Choosing kernel headers from fake /lib/modules trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.kheaders import (
    BCC_ENV,
    KernelHeadersError,
    bcc_kernel_source,
    prepare_for_bcc,
    resolve_kernel_headers,
)

RUNNING = "6.18.4-custom"


def headers_tree(root: Path, release: str, *, split: bool = True) -> Path:
    """A /lib/modules/<release> dir with Debian-style split build/source headers."""
    modules = root / "lib/modules" / release
    modules.mkdir(parents=True)
    build = root / "usr/src" / f"linux-headers-{release}"
    (build / "include/generated").mkdir(parents=True)
    (build / "include/generated/autoconf.h").write_text("#define CONFIG_X 1\n")
    (build / "arch/x86/include/generated").mkdir(parents=True)
    (build / ".config").write_text("CONFIG_X=y\n")
    if split:
        source = root / "usr/src" / f"linux-headers-{release}-common"
        (source / "include/linux").mkdir(parents=True)
        (source / "include/uapi/linux").mkdir(parents=True)
        (source / "arch/x86/include/uapi").mkdir(parents=True)
        (source / "arch/arm64").mkdir(parents=True)
        (source / "Makefile").write_text("# common\n")
        (modules / "source").symlink_to(source)
    else:
        source = build
    (source / "include/linux").mkdir(parents=True, exist_ok=True)
    (source / "include/linux/kconfig.h").write_text("/* kconfig */\n")
    (modules / "build").symlink_to(build)
    return modules


def test_exact_release_is_preferred(tmp_path: Path) -> None:
    """The running release's own headers are used without a warning."""
    headers_tree(tmp_path, "6.20.0")
    exact = headers_tree(tmp_path, RUNNING)
    found = resolve_kernel_headers("auto", modules_root=exact.parent, running=RUNNING)
    assert found.release == RUNNING and found.exact and found.warning is None
    assert found.split


def test_newest_other_release_with_warning(tmp_path: Path) -> None:
    """Without the running release, the newest installed set is chosen and the warning says so."""
    headers_tree(tmp_path, "6.1.0-9-amd64")
    headers_tree(tmp_path, "6.1.0-56-amd64")
    (tmp_path / "lib/modules/6.99.0-empty").mkdir()  # modules only, no build: skipped
    modules_root = tmp_path / "lib/modules"
    found = resolve_kernel_headers("auto", modules_root=modules_root, running=RUNNING)
    assert found.release == "6.1.0-56-amd64"
    assert not found.exact
    assert found.warning is not None
    assert RUNNING in found.warning and "6.1.0-56-amd64" in found.warning
    assert "UAPI" in found.warning


def test_explicit_modules_dir_and_build_tree(tmp_path: Path) -> None:
    """A path may name a /lib/modules/<release> dir or a self-contained build tree."""
    modules = headers_tree(tmp_path, "6.5.0")
    found = resolve_kernel_headers(str(modules), running=RUNNING)
    assert found.release == "6.5.0" and found.warning and "6.5.0" in found.warning

    tree = tmp_path / "linux"
    (tree / "include/linux").mkdir(parents=True)
    (tree / "include/linux/kconfig.h").write_text("")
    (tree / "include/config").mkdir()
    (tree / "include/config/kernel.release").write_text(RUNNING + "\n")
    own = resolve_kernel_headers(str(tree), running=RUNNING)
    assert own.release == RUNNING and own.warning is None and not own.split
    assert bcc_kernel_source(own, tmp_path / "state") == tree.resolve()


@pytest.mark.parametrize("setting", ["auto", "explicit-missing", "explicit-empty"])
def test_no_headers_is_a_clear_error(tmp_path: Path, setting: str) -> None:
    """No headers: the error names what to install and the config key to set."""
    modules_root = tmp_path / "lib/modules"
    (modules_root / RUNNING).mkdir(parents=True)  # modules without headers
    value = {
        "auto": "auto",
        "explicit-missing": str(tmp_path / "nope"),
        "explicit-empty": str(modules_root / RUNNING),
    }[setting]
    with pytest.raises(KernelHeadersError) as raised:
        resolve_kernel_headers(value, modules_root=modules_root, running=RUNNING)
    message = str(raised.value)
    assert "apt-get install linux-headers-amd64" in message
    assert "kernel-devel" in message
    assert "[bpf] kernel_headers" in message


def test_split_headers_are_merged_for_bcc(tmp_path: Path) -> None:
    """BCC gets one tree: source and build merged with symlinks, build winning, reused when current."""
    modules = headers_tree(tmp_path, "6.1.0-56-amd64")
    headers = resolve_kernel_headers(str(modules), running=RUNNING)
    state = tmp_path / "state"
    merged = bcc_kernel_source(headers, state)
    assert merged == state / "kernel-headers/6.1.0-56-amd64"
    assert (merged / "include/linux/kconfig.h").read_text() == "/* kconfig */\n"
    assert (merged / "include/generated/autoconf.h").exists()
    assert (merged / "arch/x86/include/generated").is_dir()
    assert (merged / "arch/x86/include/uapi").is_dir()
    assert (merged / "arch/arm64").is_symlink()
    assert (merged / ".config").read_text() == "CONFIG_X=y\n"
    assert (merged / "Makefile").read_text() == "# common\n"
    assert merged.is_dir() and not merged.is_symlink()
    marker = merged / "include"
    inode = marker.stat().st_ino
    assert bcc_kernel_source(headers, state) == merged
    assert marker.stat().st_ino == inode  # reused, not rebuilt


def test_prepare_sets_bcc_kernel_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_for_bcc points BCC_KERNEL_SOURCE at the chosen (merged) tree."""
    monkeypatch.delenv(BCC_ENV, raising=False)
    modules = headers_tree(tmp_path, "6.1.0-56-amd64")
    headers = prepare_for_bcc(str(modules), tmp_path / "state")
    assert headers.release == "6.1.0-56-amd64"
    assert os.environ[BCC_ENV] == str(tmp_path / "state/kernel-headers/6.1.0-56-amd64")
