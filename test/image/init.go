package image

// LabInit is the lab guest's /init. Kernel command-line parameters steer it:
//
//	ax.ip=ADDR/LEN       address of eth0 on the public segment
//	MODULE.PARAM=VALUE   a parameter of a module init loads (virtio_net.csum=0)
//	ax.dirty=MIBPS       memory dirtier rate (0: off)
//	ax.dirtysize=MIB     memory the dirtier cycles through
//	ax.tick=DURATION     interval of the console tick
//	ax.agent=0           do not start ax-agent (default: start it when present)
//	ax.flood=1           a hostile agent: garbage into the agent port instead
//	ax.disk=DEV          keep the ledger's records on block device DEV (e.g.
//	                     /dev/vda): an ack means on disk, records reload at
//	                     boot. virtio_blk probes asynchronously, so init waits
//	                     up to 5 s for DEV; without it the ledger stays in memory.
//
// It prints AXINIT lines on the console so the lab can follow the boot.
const LabInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Each module gets its parameters from the command line (NAME.PARAM=VALUE),
# as modprobe would give them: e.g. virtio_net.csum=0 turns the NIC's
# offloads off where the host's QEMU offers them (Nova's guests).
for m in $(cat /etc/ax/modules); do
	name=${m##*/}; name=${name%%.ko*}; args=
	for kv in $(cat /proc/cmdline); do
		case "$kv" in "$name".*=*) args="$args ${kv#"$name".}" ;; esac
	done
	insmod /lib/modules/$m $args || echo "AXINIT insmod $m failed"
done
IP=; DIRTY=0; DIRTYSIZE=64; TICK=100ms; AGENT=1; FLOOD=0; DISK=
for kv in $(cat /proc/cmdline); do
	case "$kv" in
	ax.ip=*) IP="${kv#ax.ip=}" ;;
	ax.dirty=*) DIRTY="${kv#ax.dirty=}" ;;
	ax.dirtysize=*) DIRTYSIZE="${kv#ax.dirtysize=}" ;;
	ax.tick=*) TICK="${kv#ax.tick=}" ;;
	ax.agent=*) AGENT="${kv#ax.agent=}" ;;
	ax.flood=*) FLOOD="${kv#ax.flood=}" ;;
	ax.disk=*) DISK="${kv#ax.disk=}" ;;
	esac
done
ip link set lo up
# Output commit makes the path look like a long-RTT link (output waits
# for its checkpoint's commit): start TCP send buffers at 1 MiB, as on any
# high bandwidth-delay path, so senders are not stuck at a few segments.
echo "4096 1048576 4194304" > /proc/sys/net/ipv4/tcp_wmem
# The held path's round trip also varies by up to one epoch (output waits
# for the end of its epoch), and comes back in trains: CUBIC's HyStart
# takes both for congestion and leaves slow start at a few segments. An FT
# guest that sends bulk data should turn it off (or use BBR).
[ -w /sys/module/tcp_cubic/parameters/hystart ] && echo 0 > /sys/module/tcp_cubic/parameters/hystart
if [ -n "$IP" ]; then
	ip link set eth0 up
	ip addr add "$IP" dev eth0
fi
# Without udev, name the virtio-serial ports as udev would.
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
	[ -e "$p/name" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$(cat $p/name)"
done
if [ -n "$DISK" ]; then
	i=0
	while [ ! -b "$DISK" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
	if [ ! -b "$DISK" ]; then
		echo "AXINIT disk $DISK missing, ledger in memory"
		DISK=
	fi
fi
/bin/ax-workload ledger ${DISK:+--disk "$DISK"} >/dev/console 2>&1 &
/bin/ax-workload app >/dev/console 2>&1 &
if [ "$FLOOD" = 1 ]; then
	/bin/ax-workload flood >/dev/console 2>&1 &
elif [ "$AGENT" != 0 ] && [ -x /bin/ax-agent ] && [ -e /etc/ax/agent.json ]; then
	/bin/ax-agent -config /etc/ax/agent.json >/dev/console 2>&1 &
fi
/bin/ax-workload tick --interval "$TICK" >/dev/console 2>&1 &
if [ "$DIRTY" != 0 ]; then
	/bin/ax-workload dirty --size "$DIRTYSIZE" --rate "$DIRTY" >/dev/console 2>&1 &
fi
echo "AXINIT up ip=$IP dirty=$DIRTY disk=$DISK"
while :; do sleep 3600; done
`

// LabAgentConfig is the lab guest's /etc/ax/agent.json: ax-agent checks the
// monitored application and restarts it when asked to.
const LabAgentConfig = `{
  "agent_id": "lab",
  "transports": ["vsock", "serial"],
  "vsock_port": 7410,
  "serial_path": "/dev/virtio-ports/org.axproject.agent.0",
  "heartbeat": "1s",
  "checks": [
    {
      "name": "app",
      "kind": "tcp",
      "address": "127.0.0.1:7001",
      "interval": "500ms",
      "timeout": "300ms",
      "threshold": 2,
      "recover": {"command": ["/bin/sh", "-c", "/bin/ax-workload app >/dev/console 2>&1 &"], "timeout": "5s", "min_interval": "1s"}
    }
  ]
}
`
