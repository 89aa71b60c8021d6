#!/bin/sh
# make openstack-down: stops the ax-openstack that make openstack-up
# started (SIGTERM: it stops every process of the cloud by pid), by the pid
# it recorded. Safe to repeat.
set -eu
dir=$1
[ -f "$dir/pid" ] || { echo "openstack-down: nothing to stop ($dir/pid missing)"; exit 0; }
pid=$(cat "$dir/pid")
if kill "$pid" 2>/dev/null; then
	i=0
	while kill -0 "$pid" 2>/dev/null && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
	if kill -0 "$pid" 2>/dev/null; then
		echo "openstack-down: pid $pid still running after 60 s" >&2
		exit 1
	fi
fi
rm -f "$dir/pid"
echo "openstack-down: stopped"
