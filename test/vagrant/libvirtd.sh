#!/bin/sh
# The system libvirtd (qemu:///system) vagrant-libvirt needs, started only if
# none answers and stopped only if this script started it, by its PID:
#   sh test/vagrant/libvirtd.sh start|stop|status
# Other libvirtds on this machine (the single-machine lab runs one per host,
# each in a mount namespace of its own, test/lab/libvirt.go) are never
# touched: this one has its own PID file and its own configuration, bound
# over /etc/libvirt in a private mount namespace of its own, so the
# machine's /etc/libvirt is not written either. Its sockets are the system
# ones in /run/libvirt, where vagrant-libvirt looks.
set -eu
run=/run/ax-vagrant
pidfile=$run/libvirtd.pid
conf=$run/etc
log=$run/libvirtd.log

answers() { timeout 10 virsh -c qemu:///system version >/dev/null 2>&1; }

ours() {
	[ -s "$pidfile" ] || return 1
	pid=$(cat "$pidfile")
	# The PID is ours only while it is still a libvirtd.
	[ "$(cat /proc/"$pid"/comm 2>/dev/null)" = libvirtd ]
}

case "${1:-}" in
start)
	if answers; then
		if ours; then echo "libvirtd: ours runs (pid $(cat "$pidfile"))" >&2; else echo "libvirtd: a system libvirtd answers; using it" >&2; fi
		exit 0
	fi
	if ours; then
		echo "libvirtd: ours (pid $(cat "$pidfile")) runs but does not answer; see $log" >&2
		exit 1
	fi
	command -v libvirtd >/dev/null || { echo "libvirtd: missing (try: make deps)" >&2; exit 1; }
	install -d -m 0755 "$run" "$conf" /etc/libvirt /run/libvirt /var/lib/libvirt/images /var/log/libvirt/qemu
	# QEMU as root without relabelling: the boxes' kernels live in the
	# build cache; no cgroups (no systemd manages this machine's tree); no
	# virtlogd (QEMU writes its own logs).
	cat >"$conf/libvirtd.conf" <<-'EOF'
		# The Vagrant lab's system libvirtd (test/vagrant/libvirtd.sh)
		unix_sock_group = "root"
		unix_sock_ro_perms = "0777"
		unix_sock_rw_perms = "0700"
		auth_unix_ro = "none"
		auth_unix_rw = "none"
		log_outputs = "3:stderr"
	EOF
	cat >"$conf/qemu.conf" <<-'EOF'
		# The Vagrant lab's QEMU driver (test/vagrant/libvirtd.sh)
		user = "root"
		group = "root"
		dynamic_ownership = 0
		remember_owner = 0
		security_driver = "none"
		cgroup_controllers = [ ]
		stdio_handler = "file"
	EOF
	setsid unshare --mount --propagation private -- sh -c \
		'mount --bind "$1" /etc/libvirt; exec libvirtd -f /etc/libvirt/libvirtd.conf -p "$2"' \
		sh "$conf" "$pidfile" </dev/null >"$log" 2>&1 &
	# Until the QEMU driver has probed QEMU (seconds under TCG) it answers nothing.
	i=0
	while ! answers; do
		i=$((i + 1))
		if [ $i -ge 60 ]; then
			echo "libvirtd: not answering after 60 tries; log: $log" >&2
			tail -5 "$log" >&2
			exit 1
		fi
		sleep 1
	done
	echo "libvirtd: started (pid $(cat "$pidfile"))" >&2
	;;
stop)
	if ! ours; then
		echo "libvirtd: none of ours runs; nothing to stop" >&2
		rm -f "$pidfile"
		exit 0
	fi
	pid=$(cat "$pidfile")
	kill "$pid"
	i=0
	while kill -0 "$pid" 2>/dev/null; do
		i=$((i + 1))
		[ $i -lt 30 ] || { echo "libvirtd: pid $pid did not stop in 30 s" >&2; exit 1; }
		sleep 1
	done
	rm -f "$pidfile"
	echo "libvirtd: stopped (pid $pid)" >&2
	# libvirtd leaves its top-level iptables chains behind, empty once its
	# networks are gone: remove those (only empty ones, in case another
	# libvirtd put rules there since).
	if command -v iptables >/dev/null; then
		for t in filter nat mangle; do
			for c in $(iptables -t $t -S 2>/dev/null | sed -n 's/^-N \(LIBVIRT_[A-Z]*\)$/\1/p'); do
				[ "$(iptables -t $t -S "$c" 2>/dev/null | grep -c '^-A')" = 0 ] || continue
				iptables -t $t -S 2>/dev/null | grep -- "-j $c\$" | sed 's/^-A/-D/' | while read -r rule; do
					eval iptables -t $t "$rule"
				done
				iptables -t $t -X "$c" 2>/dev/null || true
			done
		done
	fi
	;;
status)
	if ours; then echo "ours (pid $(cat "$pidfile"))"; elif answers; then echo "another"; else echo "none"; fi
	;;
*)
	echo "usage: sh test/vagrant/libvirtd.sh start|stop|status" >&2
	exit 2
	;;
esac
