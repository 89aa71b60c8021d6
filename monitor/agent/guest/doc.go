// Package guest is the in-guest agent behind cmd/ax-agent: it runs the
// health checks of a JSON configuration (process alive, TCP connect, HTTP
// status, command exit code) and reports them to the host's axd over
// AF_VSOCK, or a virtio-serial port where vsock is missing, reconnecting for
// as long as it runs.
//
// The host can only ask it to recover a check by name; the agent then runs
// the recovery action configured for that check inside the guest, and only
// if the check fails here and the action did not run too recently.
package guest
