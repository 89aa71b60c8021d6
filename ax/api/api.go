// Package api is the local API between axctl and axd: JSON over HTTP on a
// Unix socket, its request and status types, and the client axctl uses.
package api

import "time"

// DefaultSocket is where axd listens for axctl.
const DefaultSocket = "/run/ax/axd.sock"

// Levels a VM can be protected at.
const (
	LevelNone = "none"
	LevelHA   = "ha"
	LevelFT   = "ft"
)

// Roles of a VM on a host.
const (
	RolePrimary   = "primary"   // runs here, protected (or to be) by a partner
	RoleSecondary = "secondary" // replica of a partner's VM
	RoleLocal     = "local"     // runs here, unprotected
)

// VMSpec describes a VM to axd: how to reach it and, for the partner, how
// to start its replica.
type VMSpec struct {
	Name string `json:"name"`
	// PID of the VM's hypervisor process (for soft-dirty tracking and
	// liveness); 0 if unknown.
	PID   int   `json:"pid"`
	Guest Guest `json:"guest"`
	// Bridge is the host bridge the VM's tap joins; the partner plugs the
	// replica's tap into its bridge of the same name.
	Bridge string `json:"bridge"`
	// Tracker selects dirty-page tracking: auto, hash or soft-dirty.
	Tracker string `json:"tracker,omitempty"`
	// Policy is what axd does when an application the in-guest agent
	// checks fails: notify (default), restart-app, restart-vm or failover.
	Policy string `json:"policy,omitempty"`
}

// AppHealth is one application the in-guest agent checks.
type AppHealth struct {
	Check  string    `json:"check"`
	Health string    `json:"health"` // healthy, degraded, failed, unknown
	Since  time.Time `json:"since"`
	Detail string    `json:"detail,omitempty"`
}

// ProtectRequest asks axd to protect a defined VM.
type ProtectRequest struct {
	Level string `json:"level"`
	Peer  string `json:"peer"`
	// Force makes the partner promise capacity it does not have free.
	Force bool `json:"force,omitempty"`
}

// Capacity is what a host can run, or has promised to run after failovers.
type Capacity struct {
	VCPUs       int   `json:"vcpus"`
	MemoryBytes int64 `json:"memory_bytes"`
	DiskBytes   int64 `json:"disk_bytes"`
}

// Reservation is the capacity a host has promised its partners' VMs.
type Reservation struct {
	Host     Capacity            `json:"host"`
	Reserved Capacity            `json:"reserved"`
	Free     Capacity            `json:"free"`
	Promises map[string]Capacity `json:"promises,omitempty"`
	Forced   []string            `json:"forced,omitempty"` // VMs promised beyond capacity
	// Placement is how Nova's Placement holds the promises (nil: axd
	// does not hold them there; it does on a Nova compute host).
	Placement *PlacementHold `json:"placement,omitempty"`
}

// PlacementHold is the promises held in Placement as allocations against
// this host's resource provider.
type PlacementHold struct {
	Provider string            `json:"provider,omitempty"` // "" : not found yet
	Held     []string          `json:"held,omitempty"`     // VMs whose promise Placement holds
	Failed   map[string]string `json:"failed,omitempty"`   // VMs whose promise it does not hold, and why
	Error    string            `json:"error,omitempty"`    // why axd's last round with Placement failed
}

// VMStatus is one VM as axd sees it.
type VMStatus struct {
	Name  string `json:"name"`
	Level string `json:"level"`
	Role  string `json:"role"`
	Peer  string `json:"peer,omitempty"`
	// State: for a primary "syncing", "protected", "unprotected", "fenced",
	// "stopped"; for a secondary "syncing", "ready", "promoting", "promoted".
	State         string    `json:"state"`
	Tracker       string    `json:"tracker,omitempty"`
	Epoch         uint64    `json:"epoch"`           // last epoch taken (primary) or committed (secondary)
	Committed     uint64    `json:"committed"`       // last epoch committed on the secondary
	LastCommit    time.Time `json:"last_commit"`     // when
	CommitAgeMS   float64   `json:"commit_age_ms"`   // age of the last commit
	PauseMS       float64   `json:"pause_ms"`        // last pause, stop → cont
	PauseP50MS    float64   `json:"pause_p50_ms"`    // median of recent pauses
	PauseP99MS    float64   `json:"pause_p99_ms"`    // 99th percentile of recent pauses
	ScanP50MS     float64   `json:"scan_p50_ms"`     // dirty-page scan inside the pause (median)
	DevSaveP50MS  float64   `json:"devsave_p50_ms"`  // device-state save inside the pause (median)
	DirtyTotal    uint64    `json:"dirty_total"`     // dirty pages sent in checkpoints since protection began
	BytesTotal    uint64    `json:"bytes_total"`     // bytes sent in checkpoints since protection began
	DirtyPages    int       `json:"dirty_pages"`     // in the last checkpoint
	BytesPerSec   float64   `json:"bytes_per_sec"`   // replication rate
	SyncSent      int       `json:"sync_sent"`       // initial sync progress
	SyncTotal     int       `json:"sync_total"`      //
	ConsoleOffset int64     `json:"console_offset"`  // secondary: primary's console size at the committed epoch
	Console       string    `json:"console"`         // the console log of the VM's QEMU on this host
	Link          string    `json:"link"`            // replication link: up, down
	Witness       string    `json:"witness"`         // reachable, unreachable, none
	Alarm         string    `json:"alarm,omitempty"` // why the VM is not protected, if it is not
	// LeaseExpires is when the lease this host (the primary) last renewed
	// ends, on its clock, and LeaseLeftMS the time left then (0 once it
	// ended); both unset where no lease is known (no witness, a replica).
	LeaseExpires time.Time `json:"lease_expires,omitzero"`
	LeaseLeftMS  float64   `json:"lease_left_ms,omitempty"`
	// Declared is the level the operator declared (ft, ha, none) towards
	// DeclaredPeer; it outlives failovers, and axd protects the VM again by
	// itself while it runs below it. UnprotectedS is how long the VM has
	// been below it (0 while protected). Not shown for a replica.
	Declared     string  `json:"declared,omitempty"`
	DeclaredPeer string  `json:"declared_peer,omitempty"`
	UnprotectedS float64 `json:"unprotected_s,omitempty"`
	// Output is the guest's network output: "held" until its checkpoint
	// commits, "open" (unprotected, passing), or "not held" (no gate).
	Output     string `json:"output"`
	HeldFrames int    `json:"held_frames"`
	// Disk replication: disks, initial sync progress (bytes), bytes sent,
	// writes not yet acknowledged by the partner (primary); journal depth
	// (secondary).
	Disks         int    `json:"disks,omitempty"`
	DiskSyncDone  int64  `json:"disk_sync_done,omitempty"`
	DiskSyncTotal int64  `json:"disk_sync_total,omitempty"`
	DiskBytes     uint64 `json:"disk_bytes,omitempty"`
	DiskLag       uint64 `json:"disk_lag,omitempty"`
	// DiskMode is how writes reach the partner: "quorum" (QEMU writes the
	// disk and the partner in parallel; a guest flush waits for the
	// partner), "mirror" (each write waits for the partner; disks not set
	// up as AX's quorum nodes), or "mixed".
	DiskMode      string `json:"disk_mode,omitempty"`
	JournalWrites int    `json:"journal_writes,omitempty"`
	JournalBytes  int64  `json:"journal_bytes,omitempty"`

	// The stream's disk sync on what the partner's replica held (primary):
	// bytes of writes compared with it, and of them the bytes sent.
	DiskResyncCompared int64 `json:"disk_resync_compared,omitempty"`
	DiskResyncSent     int64 `json:"disk_resync_sent,omitempty"`
	// The in-guest agent: connected, and the health of what it checks.
	Agent string      `json:"agent"` // connected, silent, none
	Apps  []AppHealth `json:"apps,omitempty"`
}

// Status is the whole host.
type Status struct {
	Host    string       `json:"host"`
	VMs     []VMStatus   `json:"vms"`
	Peers   []PeerStatus `json:"peers"`
	Witness string       `json:"witness"`
	// WitnessHealth is the witness as axd last probed it (nil without a
	// witness, or before the first probe).
	WitnessHealth *WitnessHealth `json:"witness_health,omitempty"`
	// Reservation is the capacity promised to partners' VMs (nil before
	// axd has measured the host).
	Reservation *Reservation   `json:"reservation,omitempty"`
	Now         time.Time      `json:"now"`
	Extra       map[string]any `json:"extra,omitempty"`
}

// WitnessHealth is the witness as axd last probed it.
type WitnessHealth struct {
	Kind      string          `json:"kind"` // axd (an axd --witness), etcd
	Members   []WitnessMember `json:"members"`
	Reachable int             `json:"reachable"` // members that answered
	// Quorum: the witness can decide about leases (etcd: a majority
	// follows a leader; an axd --witness: it answered). Alarm says why not.
	Quorum     bool      `json:"quorum"`
	Alarm      string    `json:"alarm,omitempty"`
	LeaseTTLMS float64   `json:"lease_ttl_ms"`
	ProbedAt   time.Time `json:"probed_at"`
}

// WitnessMember is one member of the witness.
type WitnessMember struct {
	Name      string `json:"name,omitempty"` // etcd's member name
	Endpoint  string `json:"endpoint"`       // host:port
	Reachable bool   `json:"reachable"`
	Error     string `json:"error,omitempty"` // why it did not answer
}

// PeerStatus is what this host hears of a partner.
type PeerStatus struct {
	Name       string  `json:"name"`
	ReplHeard  bool    `json:"repl_heard"`
	MgmtHeard  bool    `json:"mgmt_heard"`
	ReplAgeMS  float64 `json:"repl_age_ms"`
	MgmtAgeMS  float64 `json:"mgmt_age_ms"`
	ReplTarget string  `json:"repl_addr"`
}

// Event is one thing axd did or saw.
type Event struct {
	Seq  uint64    `json:"seq"`
	Time time.Time `json:"time"`
	VM   string    `json:"vm,omitempty"`
	Kind string    `json:"kind"`
	Text string    `json:"text"`
}

// Error is the body of a failed request.
type Error struct {
	Error string `json:"error"`
}
