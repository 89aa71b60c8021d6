// Package heartbeat tells a failed path from a failed partner: UDP heartbeats on the replication
// link and the management network, each bound to its sender's certificate (or the lab's PSK) and
// counted only for the socket it arrived on.
package heartbeat
