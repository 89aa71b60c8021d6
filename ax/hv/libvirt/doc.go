// Package libvirt is AX's hypervisor driver for domains libvirtd runs:
// it discovers what AX protects from a running domain's XML, refusing with
// the XML change to make what it cannot protect.
package libvirt
