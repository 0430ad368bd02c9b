"""The compiled parts of the agent's data path (everything else is in pyproject.toml).

Each has a pure-Python twin that is used when its extension is not built; the
packages and `./dev.sh setup` always build them (gcc, python3-dev and libssl-dev).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # _pgscan and _link: SHA-256 from the distribution's OpenSSL (libssl-dev to build;
        # libssl3 at run time), and the msgpack writers of audit/_msgpack.h.
        Extension("agent.protocols._pgscan", ["agent/protocols/_pgscan.c"], libraries=["crypto", "m"],
                  include_dirs=["audit"], depends=["audit/_msgpack.h"]),
        Extension("policy._plainshape", ["policy/_plainshape.c"]),
        Extension("audit._link", ["audit/_link.c"], libraries=["crypto"],
                  include_dirs=["audit"], depends=["audit/_msgpack.h"]),
    ],
)
