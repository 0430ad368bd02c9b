#!/bin/sh
# ringfence postremove (dpkg postrm: remove | purge | upgrade NEW | ...;
# rpm %postun: 0 erase, 1 upgrade).
#
# remove: the agent's files are gone; what Python compiled at run time under
# /opt/ringfence goes too. The audit trail, its key and the configuration
# stay. purge (dpkg only): the audit trail, keys and configuration are
# deleted. RPM has no purge: `rpm -e` keeps /var/lib/ringfence; delete it by
# hand once the audit trail is archived.
set -e

case "$1" in
    remove|purge|0)
        rm -rf /opt/ringfence /run/ringfence
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload >/dev/null 2>&1 || true
        fi
        ;;
esac

if [ "$1" = purge ]; then
    rm -rf /var/lib/ringfence /etc/ringfence
fi
exit 0
