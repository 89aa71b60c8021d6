#!/bin/sh
# Brings the Vagrant lab up (make vagrant-up): the system libvirtd if none
# answers, the box (cached), the staged files, vagrant up. Prints how long
# each step took. Run from the top of the tree, after make build and make deb.
#   sh test/vagrant/up.sh DEB
set -eu
deb=$1
t0=$(date +%s)
sh test/vagrant/libvirtd.sh start
sh test/vagrant/box.sh >/dev/null
t1=$(date +%s)
bin/ax-vagrant-stage --deb "$deb" --out .vagrant/ax --ca-dir .vagrant/ax-ca
t2=$(date +%s)
# One machine at a time: vagrant-libvirt's parallel start races on the
# shared networks, and under TCG the boots compete for the same cores.
vagrant up --no-parallel
t3=$(date +%s)
echo "vagrant-up: box $((t1 - t0)) s, stage $((t2 - t1)) s, vagrant up $((t3 - t2)) s"
