"""The compiled parts of the agent's data path (everything else is in pyproject.toml).

Each has a pure-Python twin that is used when the extension is not built; the
packages and `./dev.sh setup` always build it (gcc and python3-dev).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("agent.protocols._pgscan", ["agent/protocols/_pgscan.c"]),
        Extension("policy._plainshape", ["policy/_plainshape.c"]),
    ],
)
