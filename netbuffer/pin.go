package netbuffer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/axproject/ax/bpf"
)

// The pins of a gate in Config.PinDir. The maps are those ax_gate uses and
// user space reads; ax_scratch is ax_gate's alone and the link holds it.
const (
	pinLink   = "link"      // the tcx link holding ax_gate at the tap's ingress
	pinState  = "ax_state"  // the epoch and the open flag
	pinFrames = "ax_frames" // the ring buffer of captured frames
	pinDrops  = "ax_drops"  // ax_gate's drop counters
	pinMeta   = "meta"      // what else adopting needs (the meta slots)
)

// pinNames in the order Detach removes them: the link first, which lets
// the tap's frames pass, meta last.
var pinNames = []string{pinLink, pinState, pinFrames, pinDrops, pinMeta}

// The slots of the meta map, an array of uint64 that user space makes.
const (
	metaFormat    = iota // metaVersion
	metaIfindex          // the tap's
	metaNetns            // the inode of the tap's network namespace
	metaMark             // release_mark, in ax_gate and in ax_release
	metaMaxFrame         // ax_gate's max_frame
	metaRingBytes        // the size of ax_frames
	metaLeft             // frames the processes that left dropped (DropLeft)
	metaSlots
)

// metaVersion is the version of the pinned format: the pin names, the meta
// slots, and the maps and constants of ax_gate that user space reads. A
// change to any of them takes a new version, which an older AX refuses to
// adopt, and the other way round.
const metaVersion = 1

// ErrNotAdoptable says that Config.PinDir holds a pinned gate, or pieces of
// one, that Attach cannot adopt: pinned for another tap, in a format this
// AX does not know, or with pieces missing or not matching. Attach changed
// nothing. Unpin removes it, with the frames it held (never released), and
// a new Attach makes a new gate.
var ErrNotAdoptable = errors.New("netbuffer: the pinned gate cannot be adopted")

// ErrInUse says that another Gate, in this process or another, holds the
// gate pinned in that directory.
var ErrInUse = errors.New("netbuffer: the pinned gate is held by another gate")

// meta is what the meta map holds.
type meta struct {
	version   uint64
	ifindex   int
	netns     uint64
	mark      uint32
	maxFrame  int
	ringBytes int
	left      uint64
}

func (m meta) slots() [metaSlots]uint64 {
	return [metaSlots]uint64{
		metaFormat:    metaVersion,
		metaIfindex:   uint64(m.ifindex),
		metaNetns:     m.netns,
		metaMark:      uint64(m.mark),
		metaMaxFrame:  uint64(m.maxFrame),
		metaRingBytes: uint64(m.ringBytes),
		metaLeft:      m.left,
	}
}

// pins is a gate's directory on a bpffs, locked while a Gate holds it.
type pins struct {
	dir   string
	lock  *os.File
	meta  *ebpf.Map // nil until made or loaded
	owned bool      // the pins are this gate's to remove: it made or adopted them
}

// openPins makes dir if missing and locks it.
func openPins(dir string) (*pins, error) {
	if err := onBPFFS(dir); err != nil {
		return nil, err
	}
	for range 3 {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("make pin directory: %w", err)
		}
		lock, err := lockDir(dir)
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed by an Unpin or Detach meanwhile
		}
		if err != nil {
			return nil, err
		}
		return &pins{dir: dir, lock: lock}, nil
	}
	return nil, fmt.Errorf("lock %s: removed each time it was made", dir)
}

// lockDir opens dir and takes an exclusive flock on it without waiting: one
// Gate at a time holds a pinned gate, and the lock ends with its process,
// however that ends. It returns an error wrapping fs.ErrNotExist if dir is
// not there, or was removed before the lock was taken.
func lockDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w (%s)", ErrInUse, dir)
		}
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	// The lock counts only on the directory still named dir.
	var locked, named unix.Stat_t
	err = unix.Fstat(int(f.Fd()), &locked)
	if err == nil {
		err = unix.Stat(dir, &named)
	}
	if err == nil && (locked.Ino != named.Ino || locked.Dev != named.Dev) {
		err = fs.ErrNotExist
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return f, nil
}

func (p *pins) path(name string) string { return filepath.Join(p.dir, name) }

// found reports whether the directory holds a pinned gate to adopt, that
// is a meta map; pieces without one are left from an interrupted Attach or
// Detach.
func (p *pins) found() (bool, error) {
	var have []string
	for _, name := range pinNames {
		_, err := os.Lstat(p.path(name))
		if err == nil {
			have = append(have, name)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return false, err
		}
	}
	if len(have) > 0 && !slices.Contains(have, pinMeta) {
		return false, fmt.Errorf("%w: %s holds %s but no %s (an Attach or a Detach was interrupted); Unpin it to attach afresh",
			ErrNotAdoptable, p.dir, strings.Join(have, ", "), pinMeta)
	}
	return len(have) > 0, nil
}

// pinNew pins a new gate's maps, then meta, which makes them adoptable
// once the link is pinned too.
func (p *pins) pinNew(objs *gateObjects, m meta) error {
	p.owned = true
	mm, err := ebpf.NewMap(&ebpf.MapSpec{
		Name: "ax_gate_meta", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: metaSlots,
	})
	if err != nil {
		return fmt.Errorf("make the meta map: %w", err)
	}
	p.meta = mm
	for i, v := range m.slots() {
		if err := mm.Update(uint32(i), v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write the meta map: %w", err)
		}
	}
	for _, pin := range []struct {
		name string
		m    *ebpf.Map
	}{{pinState, objs.AxState}, {pinFrames, objs.AxFrames}, {pinDrops, objs.AxDrops}, {pinMeta, mm}} {
		if err := pin.m.Pin(p.path(pin.name)); err != nil {
			return fmt.Errorf("pin %s: %w", pin.name, err)
		}
	}
	return nil
}

// addLeft counts frames this process dropped on leaving, for the next.
func (p *pins) addLeft(n int) error {
	var left uint64
	err := p.meta.Lookup(uint32(metaLeft), &left)
	if err == nil {
		err = p.meta.Update(uint32(metaLeft), left+uint64(n), ebpf.UpdateAny)
	}
	if err != nil {
		return fmt.Errorf("count the frames dropped on leaving: %w", err)
	}
	return nil
}

// close lets go of the directory, removing its pins first if remove and
// they are this gate's.
func (p *pins) close(remove bool) error {
	var err error
	if remove && p.owned {
		err = removePins(p.dir)
	}
	return errors.Join(err, p.meta.Close(), p.lock.Close())
}

// removePins removes the pins in dir, the link first, then dir itself
// unless something else is in it.
func removePins(dir string) error {
	var errs []error
	// Removing the last reference to a link frees it later, from a kernel
	// work queue: detach it now, so that the tap's frames pass on return.
	if l, err := link.LoadPinnedLink(filepath.Join(dir, pinLink), nil); err == nil {
		if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("detach %s: %w", pinLink, err))
		}
		l.Close()
	}
	for _, name := range pinNames {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		// Not an error if it stays: the caller may keep other things
		// there, or have mounted the bpffs right on it.
		_ = os.Remove(dir)
	}
	return errors.Join(errs...)
}

// Unpin removes the gate pinned in dir, adoptable or not: the tap it held
// lets frames pass again, and the frames it held are gone, never released.
// It does nothing if nothing is pinned there, and works when the tap is
// gone. It fails with ErrInUse while a Gate holds the pinned gate (Detach
// that one instead).
func Unpin(dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := onBPFFS(dir); err != nil {
		return err // never remove files by those names elsewhere
	}
	lock, err := lockDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("netbuffer: unpin: %w", err)
	}
	err = removePins(dir)
	if err = errors.Join(err, lock.Close()); err != nil {
		return fmt.Errorf("netbuffer: unpin %s: %w", dir, err)
	}
	return nil
}

// pinnedGate is what adopting loads from the pins.
type pinnedGate struct {
	meta meta
	link link.Link
	maps bpf.GateMaps // without AxScratch
}

func (pg *pinnedGate) close() error {
	var err error
	if pg.link != nil {
		err = pg.link.Close()
	}
	return errors.Join(err, pg.maps.AxState.Close(), pg.maps.AxFrames.Close(), pg.maps.AxDrops.Close())
}

// load loads the gate pinned in the directory, checking that its pieces
// belong together and to the tap ifindex in the network namespace ns. It
// changes nothing; on error it closes what it loaded.
func (p *pins) load(ifindex int, ns netns.NsHandle) (pg pinnedGate, err error) {
	refuse := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s; Unpin it to attach afresh", ErrNotAdoptable, p.dir, fmt.Sprintf(format, args...))
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, pg.close())
			pg = pinnedGate{}
		}
	}()
	mm, err := ebpf.LoadPinnedMap(p.path(pinMeta), nil)
	if err != nil {
		return pg, refuse("load %s: %v", pinMeta, err)
	}
	p.meta = mm // closed with p
	if pg.meta, err = readMeta(mm); err != nil {
		return pg, refuse("%v", err)
	}
	nsIno, err := nsInode(ns)
	if err != nil {
		return pg, err
	}
	switch m := pg.meta; {
	case m.ifindex != ifindex:
		return pg, refuse("pinned for the tap with ifindex %d, not %d", m.ifindex, ifindex)
	case m.netns != nsIno:
		return pg, refuse("pinned for a tap in another network namespace (inode %d, not %d)", m.netns, nsIno)
	case m.mark == 0 || m.maxFrame < 60 || m.maxFrame > bpf.MaxFrame || m.ringBytes < os.Getpagesize() || m.ringBytes&(m.ringBytes-1) != 0:
		return pg, refuse("meta holds impossible values (mark %#x, max frame %d, ring %d bytes)", m.mark, m.maxFrame, m.ringBytes)
	}

	if pg.link, err = link.LoadPinnedLink(p.path(pinLink), nil); err != nil {
		return pg, refuse("load %s: %v", pinLink, err)
	}
	info, err := pg.link.Info()
	if err != nil {
		return pg, refuse("%s: %v", pinLink, err)
	}
	switch tcx := info.TCX(); {
	case tcx == nil:
		return pg, refuse("%s is a %v link, not tcx", pinLink, info.Type)
	case tcx.Ifindex == 0:
		return pg, refuse("%s no longer holds a tap (the tap was removed)", pinLink)
	case int(tcx.Ifindex) != ifindex || ebpf.AttachType(tcx.AttachType) != ebpf.AttachTCXIngress:
		return pg, refuse("%s is attached to ifindex %d (type %d), not at the ingress of %d", pinLink, tcx.Ifindex, tcx.AttachType, ifindex)
	}
	prog, err := programOf(info.Program)
	if err != nil {
		return pg, refuse("%s: %v", pinLink, err)
	}
	if prog.mark != pg.meta.mark || prog.maxFrame != pg.meta.maxFrame {
		return pg, refuse("meta says release mark %#x and max frame %d, ax_gate has %#x and %d",
			pg.meta.mark, pg.meta.maxFrame, prog.mark, prog.maxFrame)
	}

	for _, want := range []struct {
		name       string
		m          **ebpf.Map
		typ        ebpf.MapType
		valueSize  uint32
		maxEntries uint32
	}{
		{pinState, &pg.maps.AxState, ebpf.Array, uint32(unsafe.Sizeof(bpf.GateGateState{})), 1},
		{pinFrames, &pg.maps.AxFrames, ebpf.RingBuf, 0, uint32(pg.meta.ringBytes)},
		{pinDrops, &pg.maps.AxDrops, ebpf.PerCPUArray, 8, uint32(len(kernelReasons))},
	} {
		m, err := ebpf.LoadPinnedMap(p.path(want.name), nil)
		if err != nil {
			return pg, refuse("load %s: %v", want.name, err)
		}
		*want.m = m
		mi, err := m.Info()
		if err != nil {
			return pg, refuse("%s: %v", want.name, err)
		}
		id, _ := mi.ID()
		switch {
		case !slices.Contains(prog.maps, id):
			return pg, refuse("%s is not the map the pinned ax_gate uses", want.name)
		case mi.Type != want.typ || mi.ValueSize != want.valueSize || mi.MaxEntries != want.maxEntries:
			return pg, refuse("%s is a %v map of %d entries of %d bytes, not a %v of %d of %d",
				want.name, mi.Type, mi.MaxEntries, mi.ValueSize, want.typ, want.maxEntries, want.valueSize)
		}
	}
	return pg, nil
}

// readMeta reads and checks the meta map.
func readMeta(mm *ebpf.Map) (meta, error) {
	mi, err := mm.Info()
	if err != nil {
		return meta{}, err
	}
	if mi.Type != ebpf.Array || mi.KeySize != 4 || mi.ValueSize != 8 || mi.MaxEntries == 0 {
		return meta{}, fmt.Errorf("%s is a %v map of %d entries of %d bytes, not an array of uint64", pinMeta, mi.Type, mi.MaxEntries, mi.ValueSize)
	}
	var v [metaSlots]uint64
	if err := mm.Lookup(uint32(metaFormat), &v[metaFormat]); err != nil {
		return meta{}, err
	}
	if v[metaFormat] != metaVersion {
		return meta{}, fmt.Errorf("pinned in format version %d; this AX knows version %d", v[metaFormat], metaVersion)
	}
	if mi.MaxEntries != metaSlots {
		return meta{}, fmt.Errorf("%s has %d slots, format version %d has %d", pinMeta, mi.MaxEntries, metaVersion, metaSlots)
	}
	for i := range v {
		if err := mm.Lookup(uint32(i), &v[i]); err != nil {
			return meta{}, err
		}
	}
	return meta{
		version:   v[metaFormat],
		ifindex:   int(v[metaIfindex]),
		netns:     v[metaNetns],
		mark:      uint32(v[metaMark]),
		maxFrame:  int(v[metaMaxFrame]),
		ringBytes: int(v[metaRingBytes]),
		left:      v[metaLeft],
	}, nil
}

// gateProgram is what adopting checks of the program a pinned link holds.
type gateProgram struct {
	maps     []ebpf.MapID
	mark     uint32
	maxFrame int
}

// programOf reads the program with id: it must be ax_gate; its constants
// are read from its .rodata map.
func programOf(id ebpf.ProgramID) (gateProgram, error) {
	prog, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return gateProgram{}, err
	}
	defer prog.Close()
	pi, err := prog.Info()
	if err != nil {
		return gateProgram{}, err
	}
	if pi.Name != "ax_gate" {
		return gateProgram{}, fmt.Errorf("holds program %q, not ax_gate", pi.Name)
	}
	var gp gateProgram
	var ok bool
	if gp.maps, ok = pi.MapIDs(); !ok {
		return gateProgram{}, errors.New("the kernel does not tell ax_gate's maps")
	}
	spec, err := bpf.LoadGate()
	if err != nil {
		return gateProgram{}, err
	}
	markVar, maxVar := spec.Variables["release_mark"], spec.Variables["max_frame"]
	for _, mid := range gp.maps {
		m, err := ebpf.NewMapFromID(mid)
		if err != nil {
			return gateProgram{}, err
		}
		mi, err := m.Info()
		if err != nil || !strings.HasSuffix(mi.Name, ".rodata") {
			m.Close()
			continue
		}
		ro := make([]byte, mi.ValueSize)
		err = m.Lookup(uint32(0), &ro)
		m.Close()
		if err != nil {
			return gateProgram{}, fmt.Errorf("read ax_gate's constants: %w", err)
		}
		if int(markVar.Offset)+4 > len(ro) || int(maxVar.Offset)+4 > len(ro) {
			return gateProgram{}, errors.New("ax_gate's constants are not where this AX puts them")
		}
		gp.mark = binary.NativeEndian.Uint32(ro[markVar.Offset:])
		gp.maxFrame = int(binary.NativeEndian.Uint32(ro[maxVar.Offset:]))
		return gp, nil
	}
	return gateProgram{}, errors.New("ax_gate has no .rodata map")
}

// nsInode identifies a network namespace while it exists.
func nsInode(ns netns.NsHandle) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(ns), &st); err != nil {
		return 0, fmt.Errorf("network namespace: %w", err)
	}
	return st.Ino, nil
}
