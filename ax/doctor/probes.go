package doctor

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/axproject/ax/ax/qemu"
)

// kernelFacts are what several kernel rows need.
type kernelFacts struct {
	release      string
	major, minor int
	versionErr   error
	config       map[string]string
	configErr    error
}

func probeKernelFacts(h *Host) kernelFacts {
	var k kernelFacts
	k.release, k.versionErr = h.KernelRelease()
	if k.versionErr == nil {
		k.major, k.minor, k.versionErr = parseVersion(k.release)
	}
	k.config, k.configErr = h.KernelConfig(k.release)
	return k
}

// atLeast reports whether the kernel is major.minor or later.
func (k kernelFacts) atLeast(major, minor int) bool {
	return k.major > major || k.major == major && k.minor >= minor
}

// option is a build option's value ("y", "m", "n"; absent means "n"), or
// "" when the kernel publishes no config.
func (k kernelFacts) option(name string) string {
	if k.configErr != nil {
		return ""
	}
	if v, ok := k.config[name]; ok && v != "" {
		return v
	}
	return "n"
}

// needsRoot says err is a refusal that root would not meet.
func needsRoot(h *Host, err error) bool {
	return !h.Root && (errors.Is(err, fs.ErrPermission) || errors.Is(err, unix.EPERM))
}

// rootUnknown is the row of a probe a non-root user cannot answer.
func rootUnknown(c Check, err error) Check {
	c.Status, c.Why = Unknown, fmt.Sprintf("needs root: %v", err)
	c.Fix = "run axctl doctor as root"
	return c
}

func kernelChecks(h *Host, k kernelFacts) []Check {
	var out []Check
	add := func(c Check) { c.Area = "kernel"; out = append(out, c) }

	softDirty := h.SoftDirty()
	sd := Check{What: "soft-dirty page tracking"}
	if softDirty {
		sd.Status, sd.Why = Yes, "a written page's soft-dirty bit is set: axd --tracker auto tracks dirty pages with it"
	} else {
		sd.Status, sd.Why = No, "a written page's soft-dirty bit is never set"+configNote(k, "CONFIG_MEM_SOFT_DIRTY")+"; axd --tracker auto hashes the RAM file instead, which costs CPU each epoch"
		sd.Fix = "boot a kernel built with CONFIG_MEM_SOFT_DIRTY=y (Debian's kernels are)"
	}
	add(sd)

	ps := Check{What: "PAGEMAP_SCAN soft-dirty scans (6.7+)"}
	switch err := h.PagemapScan(); {
	case errors.Is(err, unix.ENOTTY):
		ps.Status, ps.Why = No, "the kernel has no PAGEMAP_SCAN ioctl: the soft-dirty tracker reads /proc/PID/pagemap, which costs time per page of RAM"
		ps.Fix = "Linux ≥ 6.7"
	case errors.Is(err, unix.EINVAL):
		ps.Status, ps.Why = No, "the kernel's PAGEMAP_SCAN has no soft-dirty category: the soft-dirty tracker reads /proc/PID/pagemap"
		ps.Fix = "a newer kernel"
	case err != nil:
		ps.Status, ps.Why = Unknown, fmt.Sprintf("PAGEMAP_SCAN probe failed: %v", err)
	case !softDirty:
		ps.Status, ps.Why = No, "the kernel has the ioctl but tracks no soft-dirty bits (see soft-dirty page tracking)"
		ps.Fix = "CONFIG_MEM_SOFT_DIRTY=y"
	default:
		ps.Status, ps.Why = Yes, "the soft-dirty tracker scans with the ioctl"
	}
	add(ps)

	bpf := k.option("CONFIG_BPF_SYSCALL")
	version := func(what string, major, minor int, yes, no, fix string) {
		c := Check{What: what}
		switch {
		case k.versionErr != nil:
			c.Status, c.Why = Unknown, k.versionErr.Error()
		case bpf == "n":
			c.Status, c.Why = No, "CONFIG_BPF_SYSCALL is not set: no eBPF output gate, so no FT output commit"
			c.Fix = "a kernel with CONFIG_BPF_SYSCALL=y"
		case k.atLeast(major, minor):
			c.Status, c.Why = Yes, fmt.Sprintf("Linux %d.%d ≥ %d.%d: %s", k.major, k.minor, major, minor, yes)
		default:
			c.Status, c.Why, c.Fix = No, fmt.Sprintf("Linux %d.%d < %d.%d: %s", k.major, k.minor, major, minor, no), fix
		}
		add(c)
	}
	version("output gate attached with tcx (6.6+)", 6, 6,
		"the gate attaches at the head of the tap's ingress with tcx",
		"the gate attaches with clsact instead", "Linux ≥ 6.6; clsact serves meanwhile")

	cl := Check{What: "output gate attached with clsact + cls_bpf"}
	ingress, clsBPF := k.option("CONFIG_NET_SCH_INGRESS"), k.option("CONFIG_NET_CLS_BPF")
	switch {
	case k.configErr != nil:
		cl.Status, cl.Why = Unknown, fmt.Sprintf("the kernel publishes no build config (%v); clsact needs CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_BPF", k.configErr)
		cl.Fix = "none needed if tcx is yes; else the gate says so when it attaches"
	case ingress == "n" || clsBPF == "n" || bpf == "n":
		cl.Status = No
		cl.Why = fmt.Sprintf("CONFIG_NET_SCH_INGRESS=%s, CONFIG_NET_CLS_BPF=%s, CONFIG_BPF_SYSCALL=%s", ingress, clsBPF, bpf)
		cl.Fix = "a kernel with CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_BPF and CONFIG_BPF_SYSCALL (tcx needs only the last, on 6.6+)"
	default:
		cl.Status = Yes
		cl.Why = fmt.Sprintf("CONFIG_NET_SCH_INGRESS=%s, CONFIG_NET_CLS_BPF=%s (m: loaded when the gate adds its qdisc)", ingress, clsBPF)
	}
	add(cl)

	version("release by XDP live frames (5.18+)", 5, 18,
		"held frames are re-injected with BPF_PROG_RUN in live-frames mode",
		"held frames cannot be released: no FT output commit", "Linux ≥ 5.18")

	ck := Check{What: "checksum completion of offloaded frames (6.3+)"}
	if h.ChecksumKfunc() {
		ck.Status, ck.Why = Yes, "the kernel's BTF has bpf_cast_to_kern_ctx: the gate completes offloaded checksums"
	} else {
		ck.Status, ck.Why = No, "no bpf_cast_to_kern_ctx in the kernel's BTF: protected guests must not offload checksums"
		ck.Fix = "Linux ≥ 6.3 with CONFIG_DEBUG_INFO_BTF; meanwhile give protected guests virtio-net csum=off"
	}
	add(ck)

	fsCheck := Check{What: "bpffs mounted at /sys/fs/bpf"}
	switch magic, err := h.FSType("/sys/fs/bpf"); {
	case err != nil:
		fsCheck.Status, fsCheck.Why = No, fmt.Sprintf("%v; AX pins nothing there today, bpftool inspection needs it", err)
		fsCheck.Fix = "mount -t bpf bpf /sys/fs/bpf (systemd mounts it at boot)"
	case magic != unix.BPF_FS_MAGIC:
		fsCheck.Status, fsCheck.Why = No, fmt.Sprintf("/sys/fs/bpf is not a bpf file system (magic %#x); AX pins nothing there today, bpftool inspection needs it", magic)
		fsCheck.Fix = "mount -t bpf bpf /sys/fs/bpf (systemd mounts it at boot)"
	default:
		fsCheck.Status, fsCheck.Why = Yes, "bpf file system mounted"
	}
	add(fsCheck)

	add(vsockCheck(h, k))
	add(kvmCheck(h))
	return out
}

// configNote quotes a build option when the kernel publishes its config.
func configNote(k kernelFacts, name string) string {
	switch v := k.option(name); v {
	case "":
		return ""
	case "n":
		return " (" + name + " is not set)"
	default:
		return " (" + name + "=" + v + ")"
	}
}

func vsockCheck(h *Host, k kernelFacts) Check {
	c := Check{What: "vsock for the guest agent (vhost-vsock, AF_VSOCK)"}
	fix := "modprobe vhost_vsock (or a kernel with CONFIG_VHOST_VSOCK)"
	switch k.option("CONFIG_VHOST_VSOCK") {
	case "n":
		fix = "a kernel with CONFIG_VHOST_VSOCK"
	case "m":
		fix = "modprobe vhost_vsock"
	}
	err := h.OpenDevice("/dev/vhost-vsock")
	switch {
	case errors.Is(err, fs.ErrNotExist):
		c.Status, c.Why, c.Fix = No, "no /dev/vhost-vsock"+configNote(k, "CONFIG_VHOST_VSOCK")+": guests get no vsock device, the agent talks over virtio-serial", fix
		return c
	case needsRoot(h, err):
		return rootUnknown(c, err)
	case err != nil:
		c.Status, c.Why, c.Fix = No, err.Error(), fix
		return c
	}
	if err := h.VsockSocket(); err != nil {
		c.Status, c.Why, c.Fix = No, fmt.Sprintf("/dev/vhost-vsock opens but an AF_VSOCK socket does not: %v", err), "modprobe vsock"
		return c
	}
	c.Status, c.Why = Yes, "/dev/vhost-vsock opens and AF_VSOCK sockets work"
	return c
}

// kvmCheck: /dev/kvm and the CPU's hardware virtualisation
// (qemu.HardwareVirt, the lab launcher's rule too).
func kvmCheck(h *Host) Check {
	c := Check{What: "KVM usable (/dev/kvm and vmx/svm)"}
	cpuinfo, err := h.ReadFile("/proc/cpuinfo")
	if err != nil {
		c.Status, c.Why = Unknown, err.Error()
		return c
	}
	flag := qemu.HardwareVirt(cpuinfo)
	if flag == "" {
		c.Status, c.Why = No, "the CPU advertises neither vmx nor svm: guests would run under TCG, as the lab does: too slow for production"
		c.Fix = "enable VT-x/AMD-V in the firmware, or nested virtualisation on the outer hypervisor (kvm_intel nested=1)"
		return c
	}
	switch err := h.OpenDevice("/dev/kvm"); {
	case errors.Is(err, fs.ErrNotExist):
		c.Status, c.Why = No, fmt.Sprintf("the CPU has %s but there is no /dev/kvm", flag)
		c.Fix = "modprobe kvm_intel (or kvm_amd)"
	case needsRoot(h, err):
		return rootUnknown(c, err)
	case err != nil:
		c.Status, c.Why = No, err.Error()
		c.Fix = "check /dev/kvm's owner and mode (axd runs as root)"
	default:
		c.Status, c.Why = Yes, fmt.Sprintf("the CPU has %s and /dev/kvm opens", flag)
	}
	return c
}

// QMPNeeded are the QMP commands AX sends to QEMU.
var QMPNeeded = []string{
	"xen-save-devices-state", "migrate-incoming", "migrate-set-capabilities",
	"x-blockdev-change", "blockdev-mirror", "blockdev-add", "blockdev-del",
	"block-job-cancel", "query-block-jobs", "query-named-block-nodes",
	"announce-self", "query-status", "stop", "cont", "system_reset", "quit",
}

func qemuChecks(ctx context.Context, h *Host, cfg Config) []Check {
	bin := Check{Area: "qemu", What: "QEMU (" + cfg.QEMU + ")"}
	qmp := Check{Area: "qemu", What: "QMP commands AX needs"}
	path, err := h.LookPath(cfg.QEMU)
	if err != nil {
		bin.Status, bin.Why, bin.Fix = No, err.Error(), "apt install qemu-system-x86, or give --qemu BINARY"
		qmp.Status, qmp.Why = Unknown, "skipped: no QEMU to ask"
		return []Check{bin, qmp}
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.QEMUTimeout)
	defer cancel()
	if v, err := h.Output(ctx, path, "--version"); err != nil {
		bin.Status, bin.Why, bin.Fix = No, fmt.Sprintf("%s --version: %v", path, err), "reinstall qemu-system-x86"
	} else {
		first, _, _ := strings.Cut(strings.TrimSpace(string(v)), "\n")
		bin.Status, bin.Why = Yes, path+": "+first
	}
	cmds, err := h.QMPCommands(ctx, path)
	if err != nil {
		qmp.Status, qmp.Why = Unknown, err.Error()
		qmp.Fix = "check that " + path + " starts: " + path + " -machine none -nodefaults -display none -qmp stdio"
		return []Check{bin, qmp}
	}
	var missing []string
	for _, c := range QMPNeeded {
		if !slices.Contains(cmds, c) {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		qmp.Status, qmp.Why = No, "missing: "+strings.Join(missing, ", ")
		qmp.Fix = "QEMU ≥ 7.2 built with these commands (Debian 12's qemu-system-x86 has them)"
	} else {
		qmp.Status, qmp.Why = Yes, fmt.Sprintf("all %d present", len(QMPNeeded))
	}
	return []Check{bin, qmp}
}

func libvirtChecks(ctx context.Context, h *Host) []Check {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	probe := func(what, fix string, programs ...string) Check {
		c := Check{Area: "libvirt", What: what}
		for _, p := range programs {
			path, err := h.LookPath(p)
			if err != nil {
				continue
			}
			v, err := h.Output(ctx, path, "--version")
			if err != nil {
				c.Status, c.Why = Unknown, fmt.Sprintf("%s --version: %v", path, err)
				return c
			}
			c.Status, c.Why = Yes, path+": "+oneLine(string(v))
			return c
		}
		c.Status, c.Why, c.Fix = No, strings.Join(programs, " or ")+" not installed", fix
		return c
	}
	return []Check{
		probe("libvirt client", "apt install libvirt-clients (only for libvirt-managed guests)", "virsh"),
		probe("libvirt daemon", "apt install libvirt-daemon-system (only for libvirt-managed guests)", "libvirtd", "virtqemud"),
	}
}

// expirySoon is when the certificate row starts asking for a renewal.
const expirySoon = 30 * 24 * time.Hour

func identityChecks(h *Host, cfg Config) []Check {
	secret := func(what, path, fix string, read func(string) error) Check {
		c := Check{Area: "identity", What: what + " " + path}
		err := h.CheckPrivate(path)
		if err == nil {
			err = read(path)
		}
		switch {
		case needsRoot(h, err):
			return rootUnknown(c, err)
		case err != nil:
			c.Status, c.Why, c.Fix = No, err.Error(), fix
		default:
			c.Status, c.Why = Yes, "a regular file readable by its owner only"
		}
		return c
	}
	switch {
	case cfg.PSKFile != "":
		var n int
		c := secret("pre-shared key", cfg.PSKFile,
			"chmod 600 "+cfg.PSKFile+", or make a fresh one: axctl pki psk "+cfg.PSKFile,
			func(p string) error {
				key, err := h.ReadKeyFile(p)
				n = len(key)
				return err
			})
		if c.Status == Yes {
			c.Why = fmt.Sprintf("%d bytes of key, readable by its owner only; PSK mode cannot stop one key holder from impersonating another: use TLS identities (axctl pki) in production", n)
		}
		return []Check{c}
	case cfg.Identity.Cert != "" || cfg.Identity.Key != "":
		key := secret("private key", cfg.Identity.Key, "chmod 600 "+cfg.Identity.Key, func(string) error { return nil })
		cert := Check{Area: "identity", What: "certificate " + cfg.Identity.Cert}
		id, err := h.LoadIdentity(cfg.Identity)
		switch {
		case needsRoot(h, err):
			cert = rootUnknown(cert, err)
		case err != nil:
			cert.Status, cert.Why = No, err.Error()
			cert.Fix = "issue a certificate from the AX CA given as --ca: axctl pki issue --name NAME"
		default:
			cert.Status = Yes
			cert.Why = fmt.Sprintf("%s %s, chains to %s", id.Role(), id.Name(), cfg.Identity.CA)
			if leaf, err := x509.ParseCertificate(id.CertDER()); err == nil {
				left := leaf.NotAfter.Sub(h.Now())
				cert.Why += fmt.Sprintf(", valid until %s (%d days)", leaf.NotAfter.UTC().Format(time.DateOnly), int(left.Hours()/24))
				if left < expirySoon {
					cert.Why += ": renew it now"
					cert.Fix = "axctl pki issue --name " + id.Name()
				}
			}
		}
		return []Check{key, cert}
	}
	return []Check{{Area: "identity", What: "identity", Status: Unknown,
		Why: "none given",
		Fix: "give axd's --psk-file FILE (PSK mode) or --cert, --key and --ca (TLS mode) to check them"}}
}

func reachChecks(ctx context.Context, h *Host, cfg Config) []Check {
	var out []Check
	dial := func(what, addr, fix string) {
		c := Check{Area: "network", What: what}
		dctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
		err := h.DialTCP(dctx, addr)
		cancel()
		if err != nil {
			c.Status, c.Why, c.Fix = No, err.Error(), fix
		} else {
			c.Status, c.Why = Yes, "TCP connection to "+addr+" opened"
		}
		out = append(out, c)
	}
	for _, p := range cfg.Peers {
		dial("peer "+p.Name+" replication "+p.Repl+" (TCP)", p.Repl,
			"is axd running on "+p.Name+" with --repl-listen "+p.Repl+"? is a firewall between the replication links?")
		out = append(out, Check{Area: "network", What: "peer " + p.Name + " heartbeats " + p.Repl + ", " + p.Mgmt + " (UDP)",
			Status: Unknown,
			Why:    "UDP heartbeats cannot be probed without the partner's cooperation: a datagram nobody answers proves nothing",
			Fix:    "once a VM is protected, axctl status shows each heartbeat link's state"})
	}
	if cfg.WitnessAddr != "" {
		dial("witness "+cfg.WitnessAddr+" (TCP)", cfg.WitnessAddr,
			"is axd --witness running there with --listen "+cfg.WitnessAddr+"? is a firewall in the way?")
	}
	return out
}
