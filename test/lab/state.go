package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/axproject/ax/ax/api"
)

// State is what a lab made, written to disk before each object is made, so
// that Down can remove everything even after the lab command crashed.
type State struct {
	Prefix     string    `json:"prefix"`
	Status     string    `json:"status"` // "creating", "up"
	Created    time.Time `json:"created"`
	Namespaces []string  `json:"namespaces"`
	Files      []string  `json:"files"` // files and directories outside StateDir
	Procs      []Proc    `json:"procs"`
	VMs        []VM      `json:"vms"`

	path string
}

// Proc is a process the lab started. StartTicks (field 22 of /proc/PID/stat)
// tells it apart from an unrelated process that later got the same PID.
type Proc struct {
	Name       string `json:"name"`
	PID        int    `json:"pid"`
	StartTicks uint64 `json:"start_ticks"`
}

// VM is a guest the lab started.
type VM struct {
	Name    string `json:"name"`
	Host    string `json:"host"`
	Netns   string `json:"netns"`
	PID     int    `json:"pid"`
	QMP     string `json:"qmp"`
	Console string `json:"console"`
	Agent   string `json:"agent"`
	RAMFile string `json:"ram_file"`
	RAMMiB  int    `json:"ram_mib"`
	Tap     string `json:"tap"`
	MAC     string `json:"mac"`
	IP      string `json:"ip"`
	Accel   string `json:"accel"`
	// Domain is the libvirt domain's name when Host's libvirtd runs the
	// guest (DefineLibvirtGuest); empty for a QEMU the lab started itself.
	Domain string `json:"domain,omitempty"`
	// Spec is the guest as axd is told of it (DefineGuest), so the same
	// guest can be started elsewhere (the replica's QEMU on the partner
	// host).
	Spec api.Guest `json:"spec"`
}

func (s *State) save() error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	tmp := s.path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("lab state: %w", err)
	}
	if err := os.Rename(tmp, s.path); err != nil {
		return fmt.Errorf("lab state: %w", err)
	}
	return nil
}

func loadState(path string) (*State, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	s := &State{path: path}
	if err := json.Unmarshal(data, s); err != nil {
		return nil, fmt.Errorf("lab state %s is unreadable: %w", path, err)
	}
	return s, nil
}

func stateFile(dir string) string { return filepath.Join(dir, "state.json") }

// procFields returns the fields of /proc/PID/stat from the third (state) on.
func procFields(pid int) ([]string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	// The command name (field 2) may hold spaces; fields after the last ')' are plain.
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return nil, errors.New("malformed stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 || len(f[0]) != 1 {
		return nil, errors.New("malformed stat")
	}
	return f, nil
}

// procStat reads a process's start time — which with its PID names it
// uniquely — and its state letter from /proc/PID/stat.
func procStat(pid int) (startTicks uint64, state byte, err error) {
	f, err := procFields(pid)
	if err != nil {
		return 0, 0, err
	}
	startTicks, err = strconv.ParseUint(f[19], 10, 64)
	return startTicks, f[0][0], err
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's CPU times (100 on
// every Linux architecture AX runs on).
const clockTicks = 100

// procCPU is the CPU time (user + system) a process has used.
func procCPU(pid int) (time.Duration, error) {
	f, err := procFields(pid)
	if err != nil {
		return 0, err
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(u+s) * time.Second / clockTicks, nil
}

// alive reports whether p is still the process the lab started (not a zombie).
func (p Proc) alive() bool {
	t, state, err := procStat(p.PID)
	return err == nil && t == p.StartTicks && state != 'Z'
}

// stop ends p if it is still the process the lab started: SIGTERM, then SIGKILL.
func (p Proc) stop(grace time.Duration) {
	if !p.alive() {
		return
	}
	syscall.Kill(p.PID, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if !p.alive() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	if p.alive() {
		syscall.Kill(p.PID, syscall.SIGKILL)
		for i := 0; i < 100 && p.alive(); i++ {
			time.Sleep(20 * time.Millisecond)
		}
	}
}
