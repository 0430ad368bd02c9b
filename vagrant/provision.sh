#!/usr/bin/env bash
# Provision a Debian 12 host for a ringfence demo, as root. Idempotent: run it
# again after `make package` to upgrade the agent; the demo keys, database and
# configuration are made once and kept.
#
#   RINGFENCE_DEB=PATH        the package (default: the newest dist/ringfence_*_amd64.deb
#                             beside this script's repository, /vagrant in the VM)
#   RINGFENCE_DEMO_START=no   set everything up but do not start the agent
#                             (CI runs the script this way on its own machine)
#
# What it sets up:
#   - ringfence from the .deb (dependencies from Debian), PostgreSQL
#   - database "demo" with a table "accounts", open to loopback clients
#     (pg_hba trust for that database only: the agent is what checks who
#     connects, from the token and the process)
#   - a demo identity issuer: an Ed25519 key and its JWKS under
#     /etc/ringfence/demo, and /etc/ringfence/demo/token, which mints tokens
#   - the agent configuration trusting that issuer, and a demo policy:
#     unidentified clients are refused, DROP/TRUNCATE only for the dba group
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
demo=/etc/ringfence/demo
issuer=https://idp.demo.ringfence.test

if [ "$(id -u)" -ne 0 ]; then
    echo "provision.sh: run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

deb=${RINGFENCE_DEB:-$(ls "$repo"/dist/ringfence_*_amd64.deb 2>/dev/null | sort -V | tail -n 1)}
if [ -z "$deb" ] || [ ! -f "$deb" ]; then
    echo "provision.sh: no ringfence .deb; run \`make package\` in the repository first" >&2
    exit 1
fi
case "$deb" in /*) ;; *) deb=$(pwd)/$deb ;; esac

echo "--- packages"
need=()
for p in postgresql postgresql-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ] || ! apt-cache show python3-bpfcc >/dev/null 2>&1; then
    apt-get update -q
fi
apt-get install -y -q "$deb" "${need[@]}"

echo "--- PostgreSQL: database demo"
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
pg_lsclusters -h | grep . >/dev/null || pg_createcluster "$version" main
hba=$(pg_lsclusters -h | awk 'NR == 1 { print "/etc/postgresql/" $1 "/" $2 "/pg_hba.conf" }')
if ! grep -q '^# ringfence demo' "$hba"; then
    # Loopback clients of the demo database are let in by PostgreSQL; ringfence
    # in front decides who they are and what they may do.
    sed -i '1i # ringfence demo\nhost demo all 127.0.0.1/32 trust\nhost demo all ::1/128 trust' "$hba"
fi
pg_lsclusters -h | while read -r ver name _port status _rest; do
    if [ "$status" = online ]; then
        pg_ctlcluster "$ver" "$name" reload
    else
        pg_ctlcluster "$ver" "$name" start
    fi
done
as_postgres() { runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 "$@"; }
for role in alice bob; do
    as_postgres -c "DO \$\$ BEGIN CREATE ROLE $role LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END \$\$"
done
if ! as_postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'demo'" | grep 1 >/dev/null; then
    as_postgres -c "CREATE DATABASE demo"
fi
as_postgres -d demo <<'SQL'
CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, owner text, email text, balance numeric);
INSERT INTO accounts VALUES (1, 'alice', 'alice@example.com', 100), (2, 'bob', 'bob@example.com', 250)
    ON CONFLICT (id) DO NOTHING;
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON accounts TO alice, bob;
GRANT CREATE ON SCHEMA public TO alice, bob;
SQL

echo "--- demo identity issuer in $demo"
install -d -m 0755 "$demo"
if [ ! -f "$demo/issuer.key" ]; then
    (umask 077 && /opt/ringfence/bin/python - "$demo" <<'EOF'
import json, sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm

demo = Path(sys.argv[1])
key = ed25519.Ed25519PrivateKey.generate()
(demo / "issuer.key").write_bytes(key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
jwk.update(kid="demo-1", alg="EdDSA", use="sig")
(demo / "jwks.json").write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n")
EOF
    )
    chmod 0644 "$demo/jwks.json"
fi
cat >"$demo/token" <<EOF
#!/opt/ringfence/bin/python
"""Mint a demo token: token SUBJECT [GROUP...] (default groups: alice dba, others dev)."""
import sys, time, uuid
import jwt

subject = sys.argv[1] if len(sys.argv) > 1 else "alice"
groups = sys.argv[2:] or (["dba"] if subject == "alice" else ["dev"])
now = int(time.time())
claims = {"iss": "$issuer", "aud": "ringfence", "sub": subject, "groups": groups,
          "iat": now, "exp": now + 8 * 3600, "jti": str(uuid.uuid4())}
with open("$demo/issuer.key", "rb") as f:
    print(jwt.encode(claims, f.read(), algorithm="EdDSA", headers={"kid": "demo-1"}))
EOF
chmod 0700 "$demo/token"

echo "--- configuration"
config=/etc/ringfence/ringfence.toml
if ! grep -q '^# ringfence demo' "$config"; then
    cp -p "$config" "$config.packaged"
    cat >>"$config" <<EOF

# ringfence demo (vagrant/provision.sh); the file as packaged is $config.packaged.
[identity]
# The demo records findings instead of refusing, to show them.
on_finding = "flag"

[[identity.issuers]]
issuer = "$issuer"
audience = "ringfence"
jwks_file = "$demo/jwks.json"
groups_claim = "groups"
algorithms = ["EdDSA"]
EOF
fi
policy=/etc/ringfence/policy.toml
if ! grep -q '^# ringfence demo' "$policy"; then
    cp -p "$policy" "$policy.packaged"
    cat >"$policy" <<'EOF'
# ringfence demo policy (vagrant/provision.sh); the file as packaged is policy.toml.packaged.
# Every client needs a token from the demo issuer; DROP and TRUNCATE are for
# the dba group only; every statement is recorded with who sent it.

[defaults]
unidentified = "deny"
unparseable = "block"
record = "statements"

[subjects.identified]
identified = true

[subjects.dbas]
groups = ["dba"]

[resources.demo]
services = ["postgres"]
databases = ["demo"]

[[rule]]
id = "record-everything"
effect = "record"
level = "statements"
reason = "every session and statement is recorded"

[[rule]]
id = "destructive-for-dbas-only"
effect = "block"
flags = ["drop", "truncate"]
reason = "DROP and TRUNCATE are for the dba group"
[rule.unless]
subjects = ["dbas"]

[[rule]]
id = "no-delete-without-where"
effect = "block"
flags = ["delete_without_where", "update_without_where"]
reason = "DELETE or UPDATE without a WHERE clause is blocked"

[[rule]]
id = "allow-identified"
effect = "allow"
subjects = ["identified"]
resources = ["demo"]
reason = "a token from the demo issuer"
EOF
fi
ringfence policy check "$policy"

echo "--- checks"
token=$("$demo/token" alice)
/opt/ringfence/bin/python - "$token" "$demo/jwks.json" "$issuer" <<'EOF'
import json, sys
import jwt
token, jwks, issuer = sys.argv[1:]
key = jwt.PyJWKSet.from_dict(json.load(open(jwks)))["demo-1"]
claims = jwt.decode(token, key.key, algorithms=["EdDSA"], audience="ringfence", issuer=issuer)
print(f"demo token for {claims['sub']} (groups {claims['groups']}) verifies against {jwks}")
EOF
ringfence doctor

if [ "${RINGFENCE_DEMO_START:-yes}" != no ]; then
    if [ -d /run/systemd/system ]; then
        systemctl enable ringfence.service
        systemctl restart ringfence.service
        systemctl --no-pager --lines=0 status ringfence.service
    else
        echo "no systemd here: start the agent with \`ringfence run\` (Ctrl-C stops it and cleans up)"
    fi
fi

cat <<EOF

=== ringfence demo: what to try (vagrant ssh, then as the vagrant user)
  psql -h 127.0.0.1 -U alice demo -c 'SELECT * FROM accounts'
      refused: no token speaks for this client
  export RINGFENCE_TOKEN=\$(sudo $demo/token bob)
  psql -h 127.0.0.1 -U bob demo -c 'SELECT * FROM accounts'
      allowed, and recorded as bob's (token) from this psql process (kernel facts)
  psql -h 127.0.0.1 -U bob demo -c 'DROP TABLE accounts'
      blocked: DROP and TRUNCATE are for the dba group
  export RINGFENCE_TOKEN=\$(sudo $demo/token alice)
  psql -h 127.0.0.1 -U alice demo -c 'CREATE TABLE scratch (x int); DROP TABLE scratch'
      allowed: alice is in the dba group
  sudo ringfence audit tail -n 20            the records: who, which process, what
  sudo ringfence audit tail --follow --json  watch live
  sudo ringfence audit verify                hash chain and signed checkpoints
  sudo ringfence doctor                      what this host can do
  sudo ringfence redirect status; sudo ringfence bpf status
  sudo systemctl stop ringfence              rules and programs go away with it
EOF
