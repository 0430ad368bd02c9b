#!/bin/sh
# ringfence postinstall (dpkg postinst: configure OLD-VERSION; rpm %post: 1 install, 2 upgrade).
#
# Creates the state directory (audit trail, checkpoint key) and the secrets
# directory for upstream credentials, root-only, and tightens them if an
# earlier install or a hand-made directory left them open. A first install
# does not start the agent: it redirects protected ports, so it starts once
# its configuration has been reviewed (`ringfence doctor`, then
# `systemctl enable --now ringfence`). An upgrade restarts a running agent.
set -e

state_dir=/var/lib/ringfence
secrets_dir=/etc/ringfence/secrets

install -d -m 0700 -o root -g root "$state_dir"
chown root:root "$state_dir"
chmod 0700 "$state_dir"
install -d -m 0700 -o root -g root "$secrets_dir"
chmod 0700 "$secrets_dir"
for key in "$state_dir"/*.key; do
    [ -f "$key" ] && chmod 0600 "$key"
done

first=no upgrade=no
case "$1" in
    configure) if [ -n "${2:-}" ]; then upgrade=yes; else first=yes; fi ;;
    1) first=yes ;;
    2) upgrade=yes ;;
esac

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    if [ "$upgrade" = yes ]; then
        systemctl try-restart ringfence.service >/dev/null 2>&1 || true
    fi
fi

if [ "$first" = yes ]; then
    cat <<'MSG'
ringfence is installed but not started. Next:
  1. review /etc/ringfence/ringfence.toml ([[protect]]) and /etc/ringfence/policy.toml
  2. ringfence doctor
  3. systemctl enable --now ringfence
MSG
fi
exit 0
