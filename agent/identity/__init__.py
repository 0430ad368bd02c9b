"""Identity: who a connection speaks for (a verified token, a login, a service
account) and who is actually connecting (the process evidence), compared.

The session calls :class:`~agent.identity.resolver.IdentityResolver`; the
daemon starts :func:`~agent.identity.control.start_control_server`.
"""

from __future__ import annotations


class IdentityError(Exception):
    """Base class of the identity package's errors."""
