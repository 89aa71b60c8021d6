package image

// LabInit is the lab guest's /init. Kernel command-line parameters steer it:
//
//	ax.ip=ADDR/LEN       address of eth0 on the public segment
//	ax.dirty=MIBPS       memory dirtier rate (0: off)
//	ax.dirtysize=MIB     memory the dirtier cycles through
//	ax.tick=DURATION     interval of the console tick
//
// It prints AXINIT lines on the console so the lab can follow the boot.
const LabInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/ax/modules); do
	insmod /lib/modules/$m || echo "AXINIT insmod $m failed"
done
IP=; DIRTY=0; DIRTYSIZE=64; TICK=100ms
for kv in $(cat /proc/cmdline); do
	case "$kv" in
	ax.ip=*) IP="${kv#ax.ip=}" ;;
	ax.dirty=*) DIRTY="${kv#ax.dirty=}" ;;
	ax.dirtysize=*) DIRTYSIZE="${kv#ax.dirtysize=}" ;;
	ax.tick=*) TICK="${kv#ax.tick=}" ;;
	esac
done
ip link set lo up
if [ -n "$IP" ]; then
	ip link set eth0 up
	ip addr add "$IP" dev eth0
fi
/bin/ax-workload ledger >/dev/console 2>&1 &
/bin/ax-workload tick --interval "$TICK" >/dev/console 2>&1 &
if [ "$DIRTY" != 0 ]; then
	/bin/ax-workload dirty --size "$DIRTYSIZE" --rate "$DIRTY" >/dev/console 2>&1 &
fi
echo "AXINIT up ip=$IP dirty=$DIRTY"
while :; do sleep 3600; done
`
