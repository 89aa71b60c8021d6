// Package replication is the wire protocol between a primary and a secondary axd
// (framing, authentication, typed payloads) and the secondary's replica store.
package replication
