#!/bin/sh
# ringfence preremove (dpkg prerm: remove | upgrade NEW | deconfigure | failed-upgrade;
# rpm %preun: 0 erase, 1 upgrade).
#
# On removal the agent is stopped and everything it put into the kernel is
# removed, fail_closed or not: every RINGFENCE_* chain and every ringfence
# BPF program on this host. An upgrade leaves the running agent alone (the
# postinstall of the new version restarts it).
set -e

case "$1" in
    remove|0) ;;
    *) exit 0 ;;
esac

if [ -d /run/systemd/system ]; then
    systemctl disable --now ringfence.service >/dev/null 2>&1 || true
fi
if [ -x /opt/ringfence/bin/ringfence ]; then
    /opt/ringfence/bin/ringfence cleanup --all ||
        echo "ringfence: cleanup failed; check \`iptables-save -t nat | grep RINGFENCE\` and \`bpftool cgroup show /sys/fs/cgroup\`" >&2
fi
exit 0
