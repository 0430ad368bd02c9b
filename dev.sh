#!/usr/bin/env bash
# Development entry point for a Debian 12 host, run as root.
#
#   ./dev.sh setup   install Debian packages, create .venv, install ringfence into it
#   ./dev.sh up      setup, start the local PostgreSQL cluster, run the agent in the
#                    foreground with packaging/ringfence.toml (Ctrl-C stops and cleans up)
#   ./dev.sh test    setup, ruff and mypy, the whole test suite (unit and
#                    integration), the unit tests again on the Python twins of the
#                    compiled loops (RINGFENCE_IMPL=python), then build the packages
#                    and test them (package-test); with arguments, only pytest with
#                    those arguments
#   ./dev.sh package-test  setup, `make package`, then packaging/ci/package-test.sh:
#                    install the .deb, smoke session, vagrant provisioning, purge
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

debian_packages=(
    postgresql postgresql-contrib postgresql-client
    iptables iproute2 procps util-linux sudo kmod
    python3 python3-venv python3-dev python3-bpfcc bpftool linux-headers-amd64
    gcc make git haproxy nftables libssl-dev
    rpm
    libpostgresql-jdbc-java
)

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "dev.sh: run as root (the agent installs iptables rules and BPF programs)" >&2
        exit 1
    fi
}

install_debian_packages() {
    local missing=()
    for p in "${debian_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    # The JDBC client test compiles against the driver: a JDK, unless one is already there.
    command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "dev.sh: installing Debian packages: ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

create_venv() {
    # The distribution's python3 is used so that its BCC bindings (python3-bpfcc,
    # installed into /usr/lib/python3/dist-packages) are importable from the venv.
    if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
        rm -rf .venv
        /usr/bin/python3 -m venv --system-site-packages .venv
    fi
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
}

setup() {
    need_root
    install_debian_packages
    create_venv
}

start_local_postgres() {
    local version
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if ! pg_lsclusters -h 2>/dev/null | grep -q .; then
        pg_createcluster "$version" main
    fi
    pg_lsclusters -h | while read -r ver name _port status _rest; do
        [ "$status" = online ] || pg_ctlcluster "$ver" "$name" start
    done
}

package_test() {
    make package
    packaging/ci/package-test.sh
}

case "${1:-}" in
    setup)
        setup
        ;;
    up)
        setup
        start_local_postgres
        # The default config reads the policy from /etc/ringfence, as an installed agent does.
        [ -e /etc/ringfence/policy.toml ] || install -D -m 0644 packaging/policy.toml /etc/ringfence/policy.toml
        exec .venv/bin/ringfence run --config packaging/ringfence.toml
        ;;
    test)
        setup
        shift
        if [ "$#" -gt 0 ]; then
            exec .venv/bin/python -m pytest tests "$@"
        fi
        # The conventions of DESIGN.md: ruff clean, mypy strict on agent/, policy/, audit/.
        .venv/bin/ruff check .
        .venv/bin/mypy
        .venv/bin/python -m pytest tests
        # The unit tests again on the Python twins of the compiled loops (setup.py).
        RINGFENCE_IMPL=python .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit
        package_test
        ;;
    package-test)
        setup
        package_test
        ;;
    *)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
