#!/bin/sh
# Installs the Debian 12 packages the real-OpenStack test (TestOpenStackLevels)
# runs: MariaDB, RabbitMQ, uwsgi and the Python code of Keystone, Placement,
# Glance and Nova (OpenStack Zed), and python3-libvirt for Nova's libvirt
# driver and python3-neutron for Neutron's server and Linux bridge agent
# (TestIntegrationOpenStackFT in test/lab). Idempotent: installs only what is missing.
#
# Only the python3-* libraries, not Debian's service packages (keystone,
# nova-api, glance-api, placement-api, neutron-server, ...): those ask dbconfig-common and
# keystone-endpoint debconf questions, write /etc/{keystone,nova,...}, create
# system users and start system services. The test runs each service itself,
# from its Python entry point, with configuration it writes in a temp dir.
#
# mariadb-server and rabbitmq-server would start their system daemon from
# postinst: a policy-rc.d that exits 101 is in place during the install (and
# removed after, unless one was there before), and any daemon that still
# started is reported and stopped by its PID file.
set -eu
PKGS="mariadb-server rabbitmq-server uwsgi-core uwsgi-plugin-python3 python3-pymysql python3-keystone python3-placement python3-glance python3-nova python3-openstackclient python3-libvirt python3-neutron"
if [ "$(id -u)" != 0 ]; then
	echo "openstack deps: run as root" >&2
	exit 1
fi
missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
	echo "openstack deps: ok"
	exit 0
fi
rc=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "$rc" ]; then
	printf '#!/bin/sh\n# written by AX test/openstack/deps.sh for the length of an install\nexit 101\n' >"$rc"
	chmod 755 "$rc"
	ours=1
fi
trap '[ -z "$ours" ] || rm -f "$rc"' EXIT
echo "openstack deps: apt-get update" >&2
apt-get update -qq
echo "openstack deps: installing$missing" >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $missing >/dev/null
# A postinst that started its daemon anyway (outside policy-rc.d's reach):
# stop only that daemon, by its PID file.
for pidfile in /run/mysqld/mysqld.pid /run/rabbitmq/pid /var/lib/rabbitmq/mnesia/rabbit@*.pid; do
	[ -f "$pidfile" ] || continue
	pid=$(cat "$pidfile")
	if kill -0 "$pid" 2>/dev/null; then
		echo "openstack deps: a package started $pidfile's daemon (pid $pid); stopping it" >&2
		kill "$pid"
	fi
done
echo "openstack deps: ok"
