// Package agent is the host's side of the in-guest agent: the framed JSON
// protocol both ends speak, a Session per agent connection that validates,
// rate-limits and bounds everything the guest sends, and a Monitor per VM
// that turns reports into application health (healthy, degraded, failed,
// unknown) and health into the actions of the VM's policy.
//
// Nothing a guest sends is trusted: frames are size-bounded, messages are
// decoded strictly, a flooding or malformed agent is disconnected and kept
// away for a growing penalty, and the state kept per VM is bounded by
// Limits. The host may ask an agent to recover a check; it never sends a
// command line — the agent runs only the recovery action configured inside
// the guest (package guest).
package agent
