#!/bin/sh
# make openstack-up: starts ax-openstack DIR/cloud in the background and
# waits until the cloud is up (or ax-openstack ended). Its pid in DIR/pid.
set -eu
bin=$1 dir=$2
if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
	echo "openstack-up: already running (pid $(cat "$dir/pid")); make openstack-down first" >&2
	exit 1
fi
rm -rf "$dir/cloud"
mkdir -p "$dir/cloud"
setsid "$bin" "$dir/cloud" >"$dir/log" 2>&1 </dev/null &
echo $! >"$dir/pid"
echo "openstack-up: starting (pid $!, log $dir/log; 2-3 min)" >&2
while kill -0 "$(cat "$dir/pid")" 2>/dev/null; do
	if grep -q ' up: ' "$dir/log"; then
		grep ' up: ' "$dir/log" | sed 's/.* up: /openstack-up: /'
		exit 0
	fi
	sleep 2
done
tail -20 "$dir/log" >&2
rm -f "$dir/pid"
exit 1
