#!/bin/sh
# Provisions one machine of the Vagrant lab (run by Vagrant as root):
#   provision.sh hypervisor|witness|client HOST [LEASE-TTL]
# from what make vagrant-up staged for this machine in /tmp/ax-stage (see
# test/vagrant.Stage): the ax .deb, this lab's CA certificate and this
# machine's own certificate and key (made on the host when the lab came
# up; none is in the package), the guest image, ax-workload. Addresses:
# see the Vagrantfile. Safe to run again.
# LEASE-TTL (default 1s, axd's) is the witness's lease length, which the
# hosts must share: the Vagrantfile gives 10s when the machines run under
# TCG, where axd in a box with one slow vCPU may renew late and its guard
# then SIGSTOPs the guest (see the README's Vagrant lab).
set -eu
role=$1 host=$2 ttl=${3:-1s}
stage=/tmp/ax-stage
[ -d "$stage" ] || { echo "provision: $stage missing: bring the lab up with make vagrant-up" >&2; exit 1; }
case "$host" in
a) n=11 ;;
b) n=12 ;;
w) n=13 ;;
c) n=100 ;;
*) echo "provision: unknown host $host" >&2; exit 1 ;;
esac

# The lab's interfaces, named by the MACs the Vagrantfile gives them
# (52:54:00:78:<network>:<host>); on a hypervisor the public one is a port
# of br-pub, the bridge FT guests' taps join, which holds its address.
mac() { printf '52:54:00:78:%02x:%02x' "$1" "$n"; }
net() { # net NAME NETWORK-NUMBER [BRIDGE]
	if [ -n "${3:-}" ]; then
		printf '[Match]\nMACAddress=%s\nType=ether\n\n[Network]\nBridge=%s\n' "$(mac "$2")" "$3" >"/etc/systemd/network/20-$1.network"
		printf '[NetDev]\nName=%s\nKind=bridge\nMACAddress=%s\n' "$3" "$(mac "$2")" >"/etc/systemd/network/20-$3.netdev"
		printf '[Match]\nName=%s\n\n[Network]\nAddress=10.78.%d.%d/24\nConfigureWithoutCarrier=yes\n' "$3" "$2" "$n" >"/etc/systemd/network/21-$3.network"
	else
		printf '[Match]\nMACAddress=%s\nType=ether\n\n[Network]\nAddress=10.78.%d.%d/24\n' "$(mac "$2")" "$2" "$n" >"/etc/systemd/network/20-$1.network"
	fi
}
case "$role" in
hypervisor) net public 0 br-pub; net repl 1; net mgmt 2 ;;
witness) net mgmt 2 ;;
client) net public 0 ;;
esac
systemctl restart systemd-networkd

# AX from the project's package (its one dependency, QEMU, is in the box);
# the client gets none.
if [ "$role" != client ]; then
	dpkg -i "$stage"/ax_*.deb
	axd --version
fi

flags=""
pki=/etc/ax/pki
install -d -m 0700 "$pki"
install -m 0644 "$stage/pki/ca.crt" "$pki/ca.crt"
case "$role" in
hypervisor | witness)
	install -m 0644 "$stage/pki/$host.crt" "$pki/$host.crt"
	install -m 0600 "$stage/pki/$host.key" "$pki/$host.key"
	;;
esac
case "$role" in
hypervisor)
	peer=b peern=12
	[ "$host" = b ] && peer=a peern=11
	# Guest kernels and initrds a partner's VM spec may name.
	install -d -m 0755 /var/lib/ax-guest
	install -m 0644 "$stage/guest/vmlinuz" "$stage/guest/initrd" /var/lib/ax-guest/
	cat >/etc/default/axd <<-EOF
		# Written by the Vagrant lab's provisioning (test/vagrant/provision.sh).
		AXD_FLAGS="--ca $pki/ca.crt --cert $pki/$host.crt --key $pki/$host.key \
		 --repl-listen 10.78.1.$n:7400 --mgmt-listen 10.78.2.$n:7401 \
		 --peer $peer=10.78.1.$peern:7400,10.78.2.$peern:7401 \
		 --witness-addr 10.78.2.13:7402 --witness-name w \
		 --image-dir /var/lib/ax-guest --bridge br-pub --metrics 127.0.0.1:9477 --lease-ttl $ttl"
		AXW_FLAGS=""
	EOF
	systemctl enable axd
	systemctl restart axd
	systemctl is-active axd
	;;
witness)
	cat >/etc/default/axd <<-EOF
		# Written by the Vagrant lab's provisioning (test/vagrant/provision.sh).
		AXD_FLAGS=""
		AXW_FLAGS="--ca $pki/ca.crt --cert $pki/w.crt --key $pki/w.key --listen 10.78.2.13:7402 --lease-ttl $ttl"
	EOF
	systemctl enable ax-witness
	systemctl restart ax-witness
	systemctl is-active ax-witness
	;;
client)
	install -m 0755 "$stage/ax-workload" /usr/local/bin/ax-workload
	;;
esac
rm -rf "$stage"
echo "provision: $host ($role) ready"
