package guestrun

import (
	"fmt"
	"strings"
)

// Console markers between the guest's init and the host. Each stands at the
// start of its own line; the host also finds one after test output that
// lacked a final newline.
const (
	markKernel = "AXRUN-KERNEL" // AXRUN-KERNEL <uname -r>
	markBegin  = "AXRUN-BEGIN"  // AXRUN-BEGIN <name>
	markEnd    = "AXRUN-END"    // AXRUN-END <name> <exit code>
	markWarn   = "AXRUN-WARN"   // AXRUN-WARN <text>
	markDone   = "AXRUN-DONE"   // every binary ran; the guest powers off next
)

// guestInit is the test guest's /init. It prepares what the project's tests
// expect of a machine (proc, sys, dev, /tmp and /dev/shm on tmpfs, bpffs,
// debugfs, cgroup2, the wanted modules, lo up), then sources the run plan
// /etc/ax/guestrun, which calls axrun once per test binary.
const guestInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node, so init started without a console.
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/shm /dev/pts /tmp /run/axtest
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t bpf bpf /sys/fs/bpf || echo "AXRUN-WARN bpffs not mounted"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
for m in $(cat /etc/ax/modules); do
	insmod /lib/modules/$m || echo "AXRUN-WARN insmod $m failed"
done
ip link set lo up || echo "AXRUN-WARN lo not up"
echo "AXRUN-KERNEL $(uname -r)"

# axrun NAME ARGS...: run /bin/NAME.test in a directory holding its
# package's testdata, framed by markers that carry its exit code.
axrun() {
	name=$1
	shift
	dir=/run/axtest/$name
	mkdir -p "$dir"
	if [ -f "/etc/ax/$name.testdata.tar" ]; then
		tar -xf "/etc/ax/$name.testdata.tar" -C "$dir" || echo "AXRUN-WARN testdata of $name not unpacked"
	fi
	echo "AXRUN-BEGIN $name"
	(cd "$dir" && exec "/bin/$name.test" -test.v "$@")
	code=$?
	echo "AXRUN-END $name $code"
}

. /etc/ax/guestrun
echo "AXRUN-DONE"
poweroff -f
# QEMU runs with -no-reboot, so a reboot ends it as well.
reboot -f
`

// runPlan is /etc/ax/guestrun: the environment, then one axrun per binary.
func runPlan(cfg Config, bins []binary) string {
	var b strings.Builder
	b.WriteString("# Written by the host's guestrun; sourced by /init.\n")
	env := append([]string{"AX_GUESTRUN=1", "HOME=/tmp", "TMPDIR=/tmp"}, cfg.Env...)
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		fmt.Fprintf(&b, "export %s=%s\n", k, shellQuote(v))
	}
	for _, bin := range bins {
		args := []string{bin.Name, "-test.timeout=" + cfg.TestTimeout.String()}
		if bin.Package.Run != "" {
			args = append(args, "-test.run="+bin.Package.Run)
		}
		args = append(args, cfg.TestArgs...)
		b.WriteString("axrun")
		for _, a := range args {
			b.WriteString(" " + shellQuote(a))
		}
		b.WriteString("\n")
	}
	return b.String()
}

// shellQuote makes s one word for sh, whatever it holds.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
