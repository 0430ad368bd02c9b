"""Find the kernel headers BCC compiles the attribution programs against.

``[bpf] kernel_headers`` chooses them:

* ``"auto"``: ``/lib/modules/$(uname -r)/{build,source}`` when the running
  kernel's headers are installed, else the newest headers set installed under
  ``/lib/modules/*/build``, with a warning naming both releases. That is safe:
  the programs read only UAPI contexts (``struct bpf_sock_addr``,
  ``struct bpf_sock_ops``), whose layout never changes between releases.
* a path: a ``/lib/modules/<release>`` directory (with ``build`` and maybe
  ``source``) or a self-contained kernel build tree.

Distributions split headers: Debian puts generated files in
``linux-headers-<release>-<flavour>`` (``build``) and the rest in
``linux-headers-<release>-common`` (``source``). BCC accepts one directory
through ``BCC_KERNEL_SOURCE`` and uses it as both, so a split set is merged
into one tree of symlinks under the state directory (build wins).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MODULES_ROOT = Path("/lib/modules")
BCC_ENV = "BCC_KERNEL_SOURCE"
CONFIG_KEY = "[bpf] kernel_headers"
# A file every usable header tree has, directly or once build and source are merged.
_MARKER = Path("include/linux/kconfig.h")
_MERGE_STAMP = ".ringfence-merged-from"


class KernelHeadersError(Exception):
    """No usable kernel headers; the message says what to install or set."""


@dataclass(frozen=True, slots=True)
class KernelHeaders:
    """A headers set chosen for the running kernel."""

    release: str | None  # the headers' release, when known
    running: str  # uname -r
    build: Path  # generated headers (include/generated, .config)
    source: Path  # the rest; equal to build for a self-contained tree
    warning: str | None = None  # set when the release differs from the running one

    @property
    def exact(self) -> bool:
        return self.release == self.running

    @property
    def split(self) -> bool:
        return self.build.resolve() != self.source.resolve()


def install_hint() -> str:
    return (
        "install the kernel headers (Debian/Ubuntu: apt-get install linux-headers-amd64 "
        "or linux-headers-$(uname -r); Fedora/RHEL: dnf install kernel-devel) "
        f"or set {CONFIG_KEY} to a /lib/modules/<release> directory or a kernel build tree"
    )


def _version_key(release: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for kernel releases: numbers compare as numbers."""
    parts = re.split(r"(\d+)", release)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p)


def _from_modules_dir(directory: Path, running: str) -> KernelHeaders | None:
    """A headers set from a /lib/modules/<release> directory, or None without one."""
    build = directory / "build"
    if not build.is_dir():
        return None
    source = directory / "source"
    if not source.is_dir():
        source = build
    if not ((build / _MARKER).is_file() or (source / _MARKER).is_file()):
        return None
    return KernelHeaders(directory.name, running, build, source)


def _tree_release(tree: Path) -> str | None:
    for candidate in ("include/config/kernel.release",):
        try:
            return (tree / candidate).read_text().strip() or None
        except OSError:
            pass
    try:
        text = (tree / "include/generated/utsrelease.h").read_text()
    except OSError:
        return None
    m = re.search(r'UTS_RELEASE\s+"([^"]+)"', text)
    return m.group(1) if m else None


def resolve_kernel_headers(
    setting: str = "auto",
    *,
    modules_root: Path = MODULES_ROOT,
    running: str | None = None,
) -> KernelHeaders:
    """The headers set ``[bpf] kernel_headers`` selects, or :class:`KernelHeadersError`."""
    running = running or os.uname().release
    if setting and setting != "auto":
        return _explicit(Path(setting), running)

    exact = _from_modules_dir(modules_root / running, running)
    if exact is not None:
        return exact
    found: list[KernelHeaders] = []
    try:
        entries = sorted(modules_root.iterdir(), key=lambda p: _version_key(p.name))
    except OSError:
        entries = []
    for entry in entries:
        headers = _from_modules_dir(entry, running)
        if headers is not None:
            found.append(headers)
    if not found:
        raise KernelHeadersError(
            f"no kernel headers found for the running kernel {running} "
            f"(looked in {modules_root / running}/build and {modules_root}/*/build); "
            + install_hint()
        )
    newest = found[-1]
    warning = (
        f"no headers for the running kernel {running}; using the headers of {newest.release} "
        f"({newest.build}). This is safe: ringfence's BPF programs read only UAPI contexts "
        f"(struct bpf_sock_addr, struct bpf_sock_ops), which do not change between releases"
    )
    return KernelHeaders(newest.release, running, newest.build, newest.source, warning)


def _explicit(path: Path, running: str) -> KernelHeaders:
    if not path.is_dir():
        raise KernelHeadersError(
            f"{CONFIG_KEY} = {str(path)!r}: no such directory; " + install_hint()
        )
    headers = _from_modules_dir(path, running)
    if headers is None and (path / _MARKER).is_file():
        headers = KernelHeaders(_tree_release(path), running, path, path)
    if headers is None:
        raise KernelHeadersError(
            f"{CONFIG_KEY} = {str(path)!r}: neither a /lib/modules/<release> directory with "
            f"build/{_MARKER} nor a kernel build tree with {_MARKER}; " + install_hint()
        )
    if headers.release != running:
        shown = headers.release or "an unknown release"
        headers = KernelHeaders(
            headers.release,
            running,
            headers.build,
            headers.source,
            f"{CONFIG_KEY} points at headers of {shown}, the running kernel is {running}; "
            "this is safe because ringfence's BPF programs read only UAPI contexts",
        )
    return headers


def _merge(dest: Path, layers: list[Path]) -> None:
    """Fill ``dest`` with symlinks to the union of ``layers`` (later layers win).

    A name that is a directory in more than one layer becomes a real directory
    merged the same way; anything else is one symlink to the winning layer.
    """
    names: dict[str, list[Path]] = {}
    for layer in layers:
        try:
            children = sorted(layer.iterdir())
        except OSError:
            continue
        for child in children:
            names.setdefault(child.name, []).append(child)
    for name, paths in names.items():
        dirs = [p for p in paths if p.is_dir()]
        if len(dirs) > 1:
            (dest / name).mkdir()
            _merge(dest / name, dirs)
        else:
            (dest / name).symlink_to(paths[-1].resolve())


def bcc_kernel_source(headers: KernelHeaders, state_dir: Path) -> Path:
    """One directory BCC can use as both build and source for ``headers``.

    A self-contained tree is returned as is; a split set is merged under
    ``state_dir/kernel-headers/<release>`` (reused while it matches).
    """
    if not headers.split:
        return headers.build.resolve()
    build, source = headers.build.resolve(), headers.source.resolve()
    stamp_text = f"{build}\n{source}\n"
    dest = state_dir / "kernel-headers" / (headers.release or build.name)
    stamp = dest / _MERGE_STAMP
    try:
        if stamp.read_text() == stamp_text:
            return dest
    except OSError:
        pass
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _merge(tmp, [source, build])
    (tmp / _MERGE_STAMP).write_text(stamp_text)
    if dest.exists() or dest.is_symlink():
        shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def prepare_for_bcc(setting: str, state_dir: Path) -> KernelHeaders:
    """Resolve the headers and point BCC at them (``BCC_KERNEL_SOURCE``)."""
    headers = resolve_kernel_headers(setting)
    if headers.warning:
        log.warning("%s", headers.warning)
    os.environ[BCC_ENV] = str(bcc_kernel_source(headers, state_dir))
    return headers
