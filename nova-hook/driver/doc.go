// Package driver holds AX's adopting compute driver for Nova, in Python
// (ax_adopt.py, installed into Nova's nova/virt/); its Go test runs the
// driver's Python unit tests, so that go test ./... runs them.
package driver
