#!/bin/sh
# Installs the Debian packages the lab and the tests need. Idempotent: it
# installs only what is missing and refreshes apt's lists only when needed.
set -eu
# libvirt: only the daemon, its QEMU driver and virsh, which the lab runs
# one per hypervisor host (test/lab/libvirt.go). None of the three has a
# maintainer script that starts a daemon or defines a network; the full
# libvirt-daemon-system would add an init script that starts a system
# libvirtd and libvirt-daemon-config-network's autostarted default network
# (virbr0, with dnsmasq and firewall rules) — both left out on purpose.
PKGS="qemu-system-x86 qemu-utils iproute2 busybox-static netcat-openbsd ca-certificates prometheus clang llvm libbpf-dev systemd dpkg lintian systemd-container mmdebstrap etcd-server libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients vagrant vagrant-libvirt e2fsprogs openssh-client dnsmasq-base iptables"
# The Vagrant lab (Vagrantfile): vagrant and its libvirt provider (CI runs
# vagrant validate); make box builds the box with mmdebstrap, mkfs.ext4 -d
# and ssh-keygen; the system libvirtd test/vagrant/libvirtd.sh starts needs
# dnsmasq (the machines' DHCP) and iptables (libvirt's network rules).
if [ "$(id -u)" != 0 ]; then
	echo "deps: run as root (the lab needs root anyway): sudo make deps" >&2
	exit 1
fi
missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# The lab downloads its guest kernel with apt-get download: apt's lists must know it.
if [ -n "$missing" ] || ! apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; then
	echo "deps: apt-get update" >&2
	apt-get update -qq
fi
if [ -n "$missing" ]; then
	echo "deps: installing$missing" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# libvirt 9.0's QEMU driver looks up its built-in QEMU user (Debian's
# libvirt-qemu) when it starts, before reading qemu.conf, and refuses to
# start without it — even when qemu.conf says root, as the lab's does. That
# user comes from libvirt-daemon-system's postinst, left out above: make it
# the same way (group kvm, Debian's UID/GID 64055 where free).
if ! getent passwd libvirt-qemu >/dev/null; then
	getent group kvm >/dev/null || groupadd --system kvm
	getent group libvirt-qemu >/dev/null || groupadd --system $(getent group 64055 >/dev/null || echo --gid 64055) libvirt-qemu
	useradd --system $(getent passwd 64055 >/dev/null || echo --uid 64055) --gid kvm --groups libvirt-qemu \
		--home-dir /var/lib/libvirt --no-create-home --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu
	echo "deps: added user libvirt-qemu (libvirtd's QEMU driver needs it to exist)" >&2
fi
# The real OpenStack TestOpenStackLevels runs (test/openstack): its own
# script, since its packages must not start or configure system services.
# About 3 minutes on a fresh Debian 12 machine (measured: 2m50s with apt-get update).
sh "$(dirname "$0")/openstack/deps.sh"
command -v go >/dev/null || { echo "deps: Go is missing; install Go 1.26 or later (see README)" >&2; exit 1; }
echo "deps: ok"
