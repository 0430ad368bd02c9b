#!/usr/bin/env bash
# The packages as a host gets them. Run as root on Debian 12 after `make package`
# (`./dev.sh test` runs both, after the test suite):
#
#   packaging/ci/package-test.sh
#
# 1. The .rpm, with Debian's rpm: metadata, dependencies, scripts, config
#    files, digests, and an unpack into a scratch root that `rpm -V` verifies.
# 2. The .deb: `apt-get install ./…deb` (dependencies from Debian), modes of
#    what the postinstall creates, `ringfence --version` against the package
#    version, `systemd-analyze verify` of the unit, `ringfence doctor`.
# 3. A smoke session through the installed agent, started the way the unit
#    starts it (its ExecStart, under its CapabilityBoundingSet and
#    NoNewPrivileges, with NOTIFY_SOCKET) in a network namespace with its own
#    PostgreSQL, so the host's port 5432 is left alone: psql, a blocked DROP,
#    `ringfence audit tail --json` shows the statement, `audit verify` passes.
#    Then SIGTERM, and twice a crash (SIGKILL) followed by the unit's
#    ExecStopPost: no rule and no BPF program stays (the default sk_lookup
#    redirect goes with the agent's process); with fail_closed (iptables
#    REDIRECT) the rules stay and the port refuses connections.
# 4. vagrant/provision.sh, twice (it must be idempotent), without starting
#    the agent.
# 5. `apt-get remove` keeps the audit trail, its key and the configuration;
#    `apt-get purge` leaves no file, no RINGFENCE_* rule (IPv4, IPv6) and no
#    ringfence BPF program behind.
#
# Everything the script starts or creates is stopped or removed on exit, also
# when a check fails.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' agent/__init__.py)
release=${RELEASE:-1}
deb=dist/ringfence_${version}-${release}_amd64.deb
rpm_file=dist/ringfence-${version}-${release}.x86_64.rpm
unit=/usr/lib/systemd/system/ringfence.service
ns=rfpkg$$
nsenter_argv=(nsenter "--net=/run/netns/$ns" --)
work=$(mktemp -d /tmp/ringfence-package-test.XXXXXX)
chmod 0755 "$work"
started=$(date +%s)

agent_pid=
pg_pid=
installed_by_us=no
set_aside=()
cluster_started=()
cgroup_root=

step() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - started))"; }
passed=0
ok() {
    passed=$((passed + 1))
    printf 'ok    %s\n' "$*"
}
fail() {
    printf 'FAIL  %s\n' "$*" >&2
    exit 1
}

teardown() {
    local rc=$?
    set +e
    if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
        kill -TERM "$agent_pid"
        wait "$agent_pid" 2>/dev/null
    fi
    if ip netns list 2>/dev/null | grep -qw "$ns"; then
        "${nsenter_argv[@]}" /opt/ringfence/bin/ringfence redirect clean >/dev/null 2>&1
    fi
    if [ -n "$pg_pid" ] && kill -0 "$pg_pid" 2>/dev/null; then
        kill -TERM "$pg_pid"
        wait "$pg_pid" 2>/dev/null
    fi
    ip netns del "$ns" 2>/dev/null
    for cluster in "${cluster_started[@]}"; do
        # shellcheck disable=SC2086
        pg_ctlcluster $cluster stop 2>/dev/null
    done
    if [ "$installed_by_us" = yes ] && dpkg-query -W ringfence >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get purge -y -q ringfence >/dev/null 2>&1
    fi
    # What a development run had in the package's places goes back.
    for d in "${set_aside[@]}"; do
        [ -e "$d" ] || mv "$work/aside$d" "$d"
    done
    if [ $rc -ne 0 ] && [ -f "$work/agent.log" ]; then
        echo "--- agent log (last 40 lines)" >&2
        tail -n 40 "$work/agent.log" >&2
    fi
    rm -rf "$work"
    echo "package-test: $(($(date +%s) - started))s"
    if [ $rc -eq 0 ]; then
        echo "package-test: $passed passed, 0 failed"
    else
        echo "package-test: $passed passed, 1 failed"
    fi
    exit $rc
}
trap teardown EXIT

[ "$(id -u)" -eq 0 ] || fail "run as root"
[ -n "$version" ] || fail "no __version__ in agent/__init__.py"
[ -f "$deb" ] && [ -f "$rpm_file" ] || fail "$deb or $rpm_file missing: run make package"
if grep -q installed <<<"$(dpkg-query -W -f='${Status}' ringfence 2>/dev/null)"; then
    fail "ringfence is already installed here; purge it first (this test installs and purges it)"
fi
for tool in rpm nsenter setpriv iptables-save ip6tables-save bpftool psql; do
    command -v "$tool" >/dev/null || fail "$tool not found (./dev.sh setup installs it)"
done

# --------------------------------------------------------------------------- rpm
step "rpm: metadata, dependencies, scripts, digests"
[ "$(rpm -qp --qf '%{NAME} %{VERSION} %{RELEASE} %{ARCH}' "$rpm_file")" = "ringfence $version $release x86_64" ] ||
    fail "rpm name/version: $(rpm -qp --qf '%{NAME} %{VERSION} %{RELEASE} %{ARCH}' "$rpm_file")"
ok "rpm is ringfence $version-$release x86_64"
requires=$(rpm -qpR "$rpm_file")
for dep in "python3 >= 3.11" "python3 < 3.12" "python3-bcc" "/usr/sbin/iptables"; do
    grep -qxF "$dep" <<<"$requires" || fail "rpm does not require '$dep': $requires"
done
grep -qx kernel-devel <<<"$(rpm -qp --recommends "$rpm_file")" || fail "rpm does not recommend kernel-devel"
ok "rpm requires python3 3.11, python3-bcc, iptables; recommends kernel-devel"
files=$(rpm -qpl "$rpm_file")
for f in /usr/bin/ringfence /opt/ringfence/bin/ringfence /opt/ringfence/pyvenv.cfg \
    /etc/ringfence/ringfence.toml /etc/ringfence/policy.toml $unit; do
    grep -qxF "$f" <<<"$files" || fail "rpm lacks $f"
done
[ "$(rpm -qpc "$rpm_file" | sort | tr '\n' ' ')" = \
    "/etc/ringfence/policy.tests.toml /etc/ringfence/policy.toml /etc/ringfence/ringfence.toml " ] ||
    fail "rpm config files: $(rpm -qpc "$rpm_file")"
grep -qx '/etc/ringfence/ringfence.toml cn' <<<"$(rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$rpm_file")" ||
    fail "rpm: ringfence.toml is not %config(noreplace)"
ok "rpm: $(wc -l <<<"$files") files; /etc/ringfence/*.toml are %config(noreplace)"
scripts=$(rpm -qp --scripts "$rpm_file")
for phase in "postinstall scriptlet" "preuninstall scriptlet" "postuninstall scriptlet"; do
    grep -q "^$phase" <<<"$scripts" || fail "rpm has no $phase"
done
grep -q "ringfence cleanup --all" <<<"$scripts" || fail "rpm preuninstall does not clean up"
ok "rpm scriptlets: post, preun (cleanup --all), postun"
grep -q "digests OK" <<<"$(rpm -K "$rpm_file")" || fail "rpm -K: $(rpm -K "$rpm_file")"
ok "rpm -K: digests OK"
rpmroot=$work/rpmroot
mkdir -p "$rpmroot"
rpm --root "$rpmroot" --initdb
rpm --root "$rpmroot" -i --nodeps --noscripts --nosignature "$rpm_file"
rpm --root "$rpmroot" -V --nodeps --nomode ringfence || fail "rpm -V after unpack"
[ "$(readlink "$rpmroot/usr/bin/ringfence")" = /opt/ringfence/bin/ringfence ] || fail "rpm: /usr/bin/ringfence link"
rpm --root "$rpmroot" -e --nodeps --noscripts ringfence
left=$(find "$rpmroot" -path "$rpmroot/var/lib/rpm" -prune -o -path "$rpmroot/usr/lib/sysimage" -prune -o \
    -name '*ringfence*' -print)
[ -z "$left" ] || fail "rpm -e left: $left"
ok "rpm unpacked into a scratch root, verified (rpm -V), erased without leftovers"

# --------------------------------------------------------------------------- deb
snapshot() {
    {
        find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /tmp -o -path /work \
            -o -path "$repo" -o -path /root/.cache \) -prune -o -name '*ringfence*' -print
        find /run -xdev -name '*ringfence*' -print 2>/dev/null
    } | sort
}
cgroup_root=$(awk '$3 == "cgroup2" { print $2 }' /proc/mounts | sort | head -n 1)
[ -d /sys/fs/cgroup ] && grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts && cgroup_root=/sys/fs/cgroup
[ -n "$cgroup_root" ] || fail "no cgroup v2 mount"

step "deb: apt-get install ./$deb"
# A development run (./dev.sh up, the default config) keeps its state where the
# package does. Without the package installed, set it aside for the test, so
# that purge is judged against a host without ringfence, and restore it after.
if ! dpkg-query -W ringfence >/dev/null 2>&1; then
    for d in /etc/ringfence /var/lib/ringfence /run/ringfence; do
        if [ -e "$d" ]; then
            mkdir -p "$work/aside$(dirname "$d")"
            mv "$d" "$work/aside$d"
            set_aside+=("$d")
            echo "set aside for the test: $d (left by a development run)"
        fi
    done
fi
snapshot >"$work/files.before"
grep -q python3-bpfcc <<<"$(dpkg-deb -f "$deb" Depends)" || fail "deb does not depend on python3-bpfcc"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "./$deb" >"$work/apt.log" 2>&1 ||
    { cat "$work/apt.log"; fail "apt-get install ./$deb"; }
installed_by_us=yes
tail -n 5 "$work/apt.log"
[ "$(dpkg-query -W -f='${Version}' ringfence)" = "$version-$release" ] || fail "installed version"
got=$(ringfence --version)
[ "$got" = "ringfence, version $version" ] || fail "ringfence --version says '$got', expected $version"
ok "$got (package $version-$release)"
[ "$(stat -c '%a %U' /var/lib/ringfence)" = "700 root" ] || fail "/var/lib/ringfence: $(stat -c '%a %U' /var/lib/ringfence)"
[ "$(stat -c '%a %U' /etc/ringfence/secrets)" = "700 root" ] || fail "/etc/ringfence/secrets mode"
ok "postinstall: /var/lib/ringfence and /etc/ringfence/secrets are root's, 0700"
/opt/ringfence/bin/python -c 'import bcc' || fail "BCC is not importable from /opt/ringfence"
ok "the distribution's BCC bindings import from /opt/ringfence"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "$unit" || fail "systemd-analyze verify $unit"
    ok "systemd-analyze verify $unit"
fi

step "ringfence doctor (installed configuration)"
doctor_out=$(ringfence doctor) || { echo "$doctor_out"; fail "ringfence doctor"; }
echo "$doctor_out"
echo "$doctor_out" | grep -q "^OK    compiled data path" || fail "the package's compiled data path is missing"
ok "the package carries the compiled data path"

# --------------------------------------------------------------------------- smoke
step "smoke: PostgreSQL in network namespace $ns"
ip netns add "$ns"
"${nsenter_argv[@]}" ip link set lo up
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
install -d -o postgres -g postgres "$work/pgdata" "$work/pgsock"
runuser -u postgres -- "$pg_bin/initdb" -D "$work/pgdata" -A trust -U postgres --no-sync -E UTF8 --locale C >/dev/null
"${nsenter_argv[@]}" runuser -u postgres -- "$pg_bin/postgres" -D "$work/pgdata" -p 5432 \
    -c listen_addresses='127.0.0.1,::1' -c unix_socket_directories="$work/pgsock" -c fsync=off \
    >"$work/pg.log" 2>&1 &
pg_pid=$!
for _ in $(seq 1 100); do
    "${nsenter_argv[@]}" "$pg_bin/pg_isready" -q -h 127.0.0.1 -p 5432 && break
    sleep 0.2
done
"${nsenter_argv[@]}" "$pg_bin/pg_isready" -q -h 127.0.0.1 -p 5432 || { cat "$work/pg.log"; fail "PostgreSQL did not start"; }
ok "PostgreSQL $(basename "$(dirname "$pg_bin")") on 127.0.0.1:5432 and [::1]:5432 in $ns"

# The installed default configuration, with BPF required: state and audit
# trail in /var/lib/ringfence, policy /etc/ringfence/policy.toml.
write_config() { # fail_closed
    cat >"$work/smoke.toml" <<EOF
[agent]
log_format = "text"
fail_closed = $1

[bpf]
mode = "required"

[[identity.issuers]]
issuer = "https://idp.smoke.ringfence.test"
audience = "ringfence"
jwks_file = "$work/jwks.json"
algorithms = ["EdDSA"]
# psql below runs without a terminal: a workload token, not a person's.
subject_kind = "automation"

[[protect]]
name = "postgres"
protocol = "postgres"
port = 5432
EOF
}
write_config false

# A token issuer for the smoke session: an Ed25519 key and its JWKS.
/opt/ringfence/bin/python - "$work" <<'EOF'
import json, sys, time
import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm
work = sys.argv[1]
key = ed25519.Ed25519PrivateKey.generate()
jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
jwk.update(kid="smoke", alg="EdDSA", use="sig")
open(f"{work}/jwks.json", "w").write(json.dumps({"keys": [jwk]}))
now = int(time.time())
claims = {"iss": "https://idp.smoke.ringfence.test", "aud": "ringfence", "sub": "smoke-user",
          "iat": now, "exp": now + 3600}
open(f"{work}/token", "w").write(jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "smoke"}))
EOF

"${nsenter_argv[@]}" ringfence doctor --config "$work/smoke.toml" || fail "ringfence doctor in $ns"

exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
exec_stop_post=$(sed -n 's/^ExecStopPost=//p' "$unit")
caps=$(sed -n 's/^CapabilityBoundingSet=//p' "$unit" | tr 'A-Z ' 'a-z\n' | sed -n 's/^cap_/+/p' | paste -sd, -)
grep -q '^NoNewPrivileges=yes' "$unit" || fail "unit without NoNewPrivileges"
[ -n "$exec_start" ] && [ -n "$exec_stop_post" ] && [ -n "$caps" ] || fail "cannot read $unit"

start_agent() {
    rm -f "$work/notify.sock"
    python3 - "$work/notify.sock" >"$work/notify.out" 2>&1 <<'EOF' &
import socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sys.argv[1])
sock.settimeout(1)
deadline = time.monotonic() + 240
while time.monotonic() < deadline:
    try:
        data = sock.recv(4096).decode()
    except socket.timeout:
        continue
    if "READY=1" in data.split("\n"):
        print("READY=1")
        sys.exit(0)
sys.exit(1)
EOF
    local waiter=$!
    while [ ! -S "$work/notify.sock" ]; do sleep 0.05; done
    # As systemd would: the unit's environment, umask, capability bounding
    # set and no_new_privs, then its ExecStart.
    # shellcheck disable=SC2086
    (umask 077 && exec env RINGFENCE_CONFIG="$work/smoke.toml" NOTIFY_SOCKET="$work/notify.sock" \
        "${nsenter_argv[@]}" setpriv --no-new-privs --inh-caps=-all --bounding-set="-all,$caps" -- \
        $exec_start) >>"$work/agent.log" 2>&1 &
    agent_pid=$!
    while kill -0 "$waiter" 2>/dev/null; do
        kill -0 "$agent_pid" 2>/dev/null || { kill "$waiter"; fail "the agent exited before READY=1"; }
        sleep 0.2
    done
    wait "$waiter" || fail "no READY=1 from the agent"
    ok "agent pid $agent_pid sent READY=1 (capabilities: $caps)"
}

stop_post() {
    # shellcheck disable=SC2086
    RINGFENCE_CONFIG="$work/smoke.toml" "${nsenter_argv[@]}" $exec_stop_post
}

psql_ns() {
    "${nsenter_argv[@]}" psql -X -v ON_ERROR_STOP=1 -h "$1" -p 5432 -U postgres -d postgres -At -c "$2"
}

ns_rules() {
    { "${nsenter_argv[@]}" iptables-save -t nat; "${nsenter_argv[@]}" ip6tables-save -t nat; } | grep -c RINGFENCE || true
}

ns_steering() { # the agents' sk_lookup programs attached to the namespace (the default redirect)
    ringfence redirect status | grep -c "attached to network namespace $(stat -L -c %i "/run/netns/$ns") " || true
}

attached_ids() { # program ids recorded by the running agent
    python3 -c 'import json,sys; print(" ".join(str(p["id"]) for p in json.load(open(sys.argv[1]))["programs"]))' \
        /var/lib/ringfence/bpf-attachments.json
}

still_attached() { # ids...
    local shown id left=
    shown=$(bpftool cgroup show "$cgroup_root")
    for id in "$@"; do
        awk '{ print $1 }' <<<"$shown" | grep -x "$id" >/dev/null && left="$left $id"
    done
    echo "$left"
}

step "smoke: a session through the installed agent"
start_agent
[ "$(ns_steering)" -eq 1 ] || fail "no sk_lookup program in $ns while the agent runs"
[ "$(ns_rules)" -eq 0 ] || fail "RINGFENCE rules in $ns beside the sk_lookup program"
ids=$(attached_ids)
[ -n "$ids" ] || fail "no BPF attachment record in /var/lib/ringfence"
[ "$(still_attached $ids | wc -w)" -eq "$(wc -w <<<"$ids")" ] || fail "programs $ids are not attached to $cgroup_root"
ok "sk_lookup redirect in $ns; BPF programs $ids attached to $cgroup_root"
out=$(psql_ns 127.0.0.1 "SELECT 'ringfence-smoke-' || 4 * 10 + 2")
[ "$out" = ringfence-smoke-42 ] || fail "psql through the agent said: $out"
out=$(psql_ns ::1 "SELECT 'ringfence-smoke-v6'")
[ "$out" = ringfence-smoke-v6 ] || fail "psql over IPv6 through the agent said: $out"
psql_ns 127.0.0.1 "CREATE TABLE smoke (id int)" >/dev/null
if psql_ns 127.0.0.1 "DROP TABLE smoke" >"$work/drop.out" 2>&1; then
    fail "DROP TABLE was not blocked by the default policy"
fi
grep -q "DROP is blocked" "$work/drop.out" || fail "DROP refused without the policy's reason: $(cat "$work/drop.out")"
ok "psql over IPv4 and IPv6 answered through the agent; DROP TABLE blocked: $(grep -o 'DROP is blocked[^"]*' "$work/drop.out" | head -n 1)"
# A client of another user with a token in its environment: reading it takes
# the unit's CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH.
out=$("${nsenter_argv[@]}" runuser -u nobody -- env RINGFENCE_TOKEN="$(cat "$work/token")" \
    psql -X -h 127.0.0.1 -p 5432 -U postgres -d postgres -At -c "SELECT 'ringfence-smoke-token'")
[ "$out" = ringfence-smoke-token ] || fail "psql as nobody with a token said: $out"

ringfence audit --config "$work/smoke.toml" tail --json -n 100 >"$work/tail.json"
python3 - "$work/tail.json" <<'EOF' || fail "the audit trail does not show the session"
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
text = json.dumps(records)
queries = [r for r in records if r["type"] == "query"]
assert any("ringfence-smoke-" in json.dumps(r) for r in queries), "no query record with the statement"
assert any("DROP TABLE smoke" in json.dumps(r) for r in records), "no record of the blocked DROP"
starts = [r for r in records if r["type"] == "session.start"]
assert starts, "no session.start record"
assert all('"source": "bpf"' in json.dumps(s) for s in starts), "a session not attributed by BPF"
token_sessions = [r["session_id"] for r in records if "smoke-user" in json.dumps(r)]
assert token_sessions, "no record names the token's subject smoke-user"
assert any('"uid": 65534' in json.dumps(s) for s in starts if s["session_id"] in token_sessions), \
    "the token session is not from uid nobody"
print(f"ok    audit tail: {len(records)} records, {len(starts)} sessions, {len(queries)} queries, "
      "attributed by BPF; the token session is smoke-user's, from uid nobody")
EOF
passed=$((passed + 1))
grep -m 1 'ringfence-smoke-' "$work/tail.json" | cut -c 1-300
ringfence audit --config "$work/smoke.toml" verify || fail "ringfence audit verify"

step "smoke: SIGTERM"
kill -TERM "$agent_pid"
wait "$agent_pid" || fail "the agent exited $? after SIGTERM"
agent_pid=
verified=$(ringfence audit --config "$work/smoke.toml" verify) || fail "ringfence audit verify after the stop"
grep -q " 0 checkpoint" <<<"$verified" && fail "no signed checkpoint after the stop: $verified"
ok "audit verify after the stop: $verified"
[ "$(ns_steering)" -eq 0 ] || fail "the sk_lookup program left in $ns after SIGTERM"
[ -z "$(still_attached $ids)" ] || fail "BPF programs$(still_attached $ids) left after SIGTERM"
stop_post || fail "ExecStopPost after a clean stop"
ok "stopped cleanly: no redirect in $ns, programs $ids detached; ExecStopPost ran"

step "smoke: crash (SIGKILL), then the unit's ExecStopPost"
start_agent
ids=$(attached_ids)
kill -KILL "$agent_pid"
wait "$agent_pid" 2>/dev/null || true
agent_pid=
[ "$(ns_steering)" -eq 0 ] || fail "the killed agent's sk_lookup program outlived it"
stop_post
[ "$(ns_rules)" -eq 0 ] || fail "RINGFENCE rules left in $ns after ExecStopPost"
[ -z "$(still_attached $ids)" ] || fail "BPF programs$(still_attached $ids) left after ExecStopPost"
ok "after a crash, its sk_lookup program was gone with it; ExecStopPost detached programs $ids"
[ "$(psql_ns 127.0.0.1 "SELECT 'direct'")" = direct ] || fail "port 5432 unreachable after cleanup"
ok "port 5432 answers directly again"

step "smoke: crash with [agent] fail_closed = true"
write_config true
start_agent
ids=$(attached_ids)
kill -KILL "$agent_pid"
wait "$agent_pid" 2>/dev/null || true
agent_pid=
stop_post
[ "$(ns_rules)" -gt 0 ] || fail "fail_closed: ExecStopPost removed the rules (or redirect.method auto did not choose nat)"
[ -z "$(still_attached $ids)" ] || fail "fail_closed: BPF programs$(still_attached $ids) left"
if psql_ns 127.0.0.1 "SELECT 1" >/dev/null 2>&1; then
    fail "fail_closed: port 5432 reachable without the agent"
fi
ok "fail_closed: rules kept, port 5432 refuses connections, programs detached"
"${nsenter_argv[@]}" ringfence redirect clean
[ "$(ns_rules)" -eq 0 ] || fail "ringfence redirect clean left rules"
write_config false

kill -TERM "$pg_pid"
wait "$pg_pid" 2>/dev/null || true
pg_pid=
ip netns del "$ns"

# --------------------------------------------------------------------------- vagrant
step "vagrant/provision.sh (twice: idempotent), agent not started"
online_before=$(pg_lsclusters -h 2>/dev/null | awk '$4 == "online" { print $1 " " $2 }')
for run in 1 2; do
    RINGFENCE_DEB="$repo/$deb" RINGFENCE_DEMO_START=no bash vagrant/provision.sh >"$work/provision.$run.log" 2>&1 ||
        { cat "$work/provision.$run.log"; fail "vagrant/provision.sh (run $run)"; }
done
while read -r ver name; do
    [ -n "$ver" ] || continue
    grep -qx "$ver $name" <<<"$online_before" || cluster_started+=("$ver $name")
done < <(pg_lsclusters -h 2>/dev/null | awk '$4 == "online" { print $1 " " $2 }')
sed -n '/^=== ringfence demo/,$p' "$work/provision.2.log"
ok "provisioned twice"
for cluster in "${cluster_started[@]}"; do
    # shellcheck disable=SC2086
    pg_ctlcluster $cluster stop
done
cluster_started=()

# --------------------------------------------------------------------------- remove, purge
step "apt-get remove: audit trail, key and configuration stay"
[ -f /var/lib/ringfence/audit.key ] || fail "no audit key after the smoke session"
DEBIAN_FRONTEND=noninteractive apt-get remove -y -q ringfence >"$work/apt.log" 2>&1 ||
    { cat "$work/apt.log"; fail "apt-get remove"; }
for gone in /opt/ringfence /usr/bin/ringfence "$unit" /usr/share/doc/ringfence /run/ringfence; do
    [ ! -e "$gone" ] && [ ! -L "$gone" ] || fail "$gone left after remove"
done
for kept in /var/lib/ringfence/audit.key /var/lib/ringfence/audit /etc/ringfence/ringfence.toml /etc/ringfence/policy.toml; do
    [ -e "$kept" ] || fail "$kept removed by apt-get remove"
done
[ "$(stat -c %a /var/lib/ringfence/audit.key)" = 600 ] || fail "audit.key mode"
grep -q "config-files" <<<"$(dpkg-query -W -f='${Status}\n' ringfence)" || fail "package state after remove"
ok "removed; kept /var/lib/ringfence (audit trail, audit.key 0600) and /etc/ringfence"

step "apt-get purge: nothing left"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q ringfence >"$work/apt.log" 2>&1 ||
    { cat "$work/apt.log"; fail "apt-get purge"; }
installed_by_us=no
snapshot >"$work/files.after"
if ! diff -u "$work/files.before" "$work/files.after"; then
    fail "files left (or removed) by install + purge, above"
fi
ok "no ringfence file left anywhere (compared with before the install)"
if grep RINGFENCE <<<"$(iptables-save -t nat; ip6tables-save -t nat)"; then
    fail "RINGFENCE rules left on the host"
fi
ok "no RINGFENCE rule on the host (iptables, ip6tables)"
if [ "${CI:-}" = true ]; then
    # Nothing else runs in CI now: every ringfence program must be gone.
    if grep ringfence_ <<<"$(bpftool cgroup show "$cgroup_root")"; then
        fail "ringfence BPF programs left on $cgroup_root"
    fi
    ok "no ringfence BPF program on $cgroup_root"
    if grep ringfence_sk <<<"$(bpftool prog show)"; then
        fail "a ringfence sk_lookup program left loaded"
    fi
    ok "no ringfence sk_lookup program loaded"
fi
