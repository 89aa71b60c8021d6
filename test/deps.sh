#!/bin/sh
# Installs the Debian packages the lab and the tests need. Idempotent: it
# installs only what is missing and refreshes apt's lists only when needed.
set -eu
PKGS="qemu-system-x86 qemu-utils iproute2 busybox-static netcat-openbsd ca-certificates prometheus clang llvm libbpf-dev systemd dpkg lintian systemd-container mmdebstrap etcd-server"
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
command -v go >/dev/null || { echo "deps: Go is missing; install Go 1.26 or later (see README)" >&2; exit 1; }
echo "deps: ok"
