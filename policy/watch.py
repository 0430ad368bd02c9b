"""Hot reload: :class:`PolicyHolder` keeps the policy in force.

The agent calls :meth:`PolicyHolder.reload` on SIGHUP and
:meth:`PolicyHolder.maybe_reload` periodically; the latter costs one
``stat()`` unless the file changed (inode, size or mtime). A file that does
not load leaves the previous policy in force and the error is returned, so the
caller can log it and write it to the audit trail.
"""

from __future__ import annotations

import os
from pathlib import Path

from policy.classify import Classifier
from policy.evaluate import Policy
from policy.loader import PolicyError, parse_policy, read_policy_file

_Signature = tuple[int, int, int, int]


def _signature(path: Path) -> _Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class PolicyHolder:
    """The current policy of one file; ``current`` is swapped atomically on reload."""

    def __init__(self, path: str | os.PathLike[str], classifier: Classifier | None = None) -> None:
        """Load ``path``; raises :class:`PolicyError` when the first load fails (fail closed)."""
        self.path = Path(path)
        self._classifier = classifier
        self._signature = _signature(self.path)
        self.current: Policy = parse_policy(
            read_policy_file(self.path), source=self.path, classifier=classifier
        )
        self.last_error: str | None = None

    @property
    def version(self) -> str:
        return self.current.version

    def reload(self) -> tuple[bool, str]:
        """Load the file again: (True, what changed) or (False, the error; old policy kept)."""
        self._signature = _signature(self.path)
        try:
            policy = parse_policy(read_policy_file(self.path), source=self.path, classifier=self._classifier)
        except PolicyError as e:
            self.last_error = str(e)
            return False, f"policy not reloaded, version {self.version[:12]} stays in force: {e}"
        self.last_error = None
        if policy.version == self.current.version:
            return True, f"policy unchanged (version {policy.version[:12]})"
        old = self.current.version
        self.current = policy
        return True, f"policy reloaded: version {old[:12]} -> {policy.version[:12]}"

    def maybe_reload(self) -> tuple[bool, str] | None:
        """Reload when the file's inode, size or mtime changed; None when it did not."""
        if _signature(self.path) == self._signature:
            return None
        return self.reload()
