#!/bin/sh
# Build the agent's virtual environment for the packages, at its final path.
#
#   packaging/build-venv.sh STAGE WHEELS PIP VERSION [PYTHON]
#
# STAGE/opt/ringfence receives a venv that is, byte for byte, the one a host
# gets at /opt/ringfence: inside a private mount namespace STAGE/opt is
# bind-mounted over /opt, so the venv is created and filled at /opt/ringfence
# (shebangs, pyvenv.cfg and compiled files all name the real path) while this
# machine's own /opt, and any ringfence installed there, stay untouched.
#
# The venv uses PYTHON (default /usr/bin/python3, the distribution's) with
# --system-site-packages, so the distribution's BCC bindings import from it.
# Every Python dependency is installed into the venv (--ignore-installed), so
# nothing depends on which python3-* packages the build machine happens to
# have. Files are compiled with checked-hash invalidation: the interpreter
# never needs to write __pycache__ under /opt/ringfence at run time.
set -eu

stage=$1 wheels=$2 pip=$3 version=$4 python=${5:-/usr/bin/python3}

here=$(pwd)
case "$here/" in
    /opt/*) echo "build-venv: build from a checkout outside /opt (it is hidden while the venv is built)" >&2
            exit 1 ;;
esac
case "$stage" in /*) ;; *) stage=$here/$stage ;; esac
case "$wheels" in /*) ;; *) wheels=$here/$wheels ;; esac
case "$pip" in /*) ;; *) pip=$here/$pip ;; esac

rm -rf "$stage"
mkdir -p "$stage/opt"

if [ "$(id -u)" -eq 0 ]; then
    enter="unshare --mount --propagation private"
else
    enter="unshare --user --map-root-user --mount --propagation private"
fi

# shellcheck disable=SC2016
$enter sh -eu -c '
    stage=$1 wheels=$2 pip=$3 version=$4 python=$5
    mount --bind "$stage/opt" /opt
    "$python" -m venv --without-pip --system-site-packages /opt/ringfence
    "$pip" --python /opt/ringfence/bin/python install -q --disable-pip-version-check \
        --no-compile --no-warn-script-location --ignore-installed "$wheels"/ringfence-*.whl
    rm -f /opt/ringfence/bin/Activate.ps1
    /opt/ringfence/bin/python -m compileall -q -j 0 --invalidation-mode checked-hash \
        /opt/ringfence/lib >/dev/null
    /opt/ringfence/bin/python -c "import agent.cli, agent.daemon, agent.protocols._pgscan, policy._plainshape, audit._link, audit, policy, lmdb, msgpack, uvloop, pglast, jwt, cryptography"
    got=$(/opt/ringfence/bin/ringfence --version)
    case "$got" in
        *" $version") ;;
        *) echo "build-venv: ringfence --version says \"$got\", expected $version" >&2; exit 1 ;;
    esac
    if ! /opt/ringfence/bin/python -c "import bcc" 2>/dev/null; then
        echo "build-venv: warning: BCC is not importable here (install python3-bpfcc to check it)" >&2
    fi
' build-venv "$stage" "$wheels" "$pip" "$version" "$python"

echo "build-venv: $stage/opt/ringfence ($(du -sh "$stage/opt/ringfence" | cut -f1)) for ringfence $version"
