#!/bin/sh
# Removes the Vagrant lab (make vagrant-down): its machines (with their
# networks, which vagrant-libvirt made), the staged files, and the system
# libvirtd if test/vagrant/libvirtd.sh started it. Safe to repeat.
set -eu
if command -v vagrant >/dev/null && [ -d .vagrant/machines ]; then
	vagrant destroy -f || true
fi
# Networks vagrant-libvirt left (they go with their last machine normally).
for n in ax-public ax-repl ax-mgmt ax-vagrant-mgmt; do
	if virsh -c qemu:///system net-info "$n" >/dev/null 2>&1; then
		virsh -c qemu:///system net-destroy "$n" >/dev/null 2>&1 || true
		virsh -c qemu:///system net-undefine "$n" >/dev/null 2>&1 || true
	fi
done
rm -rf .vagrant/ax .vagrant/ax-ca
sh test/vagrant/libvirtd.sh stop
