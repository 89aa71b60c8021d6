// Package dirty finds the 4 KiB pages of a VM's RAM file that were written
// since the last scan, by hashing the file or by reading QEMU's soft-dirty bits.
package dirty
