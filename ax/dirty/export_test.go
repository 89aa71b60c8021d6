package dirty

// Test hooks.

// DisablePagemapScan makes t read /proc/PID/pagemap instead of using the
// PAGEMAP_SCAN ioctl.
func DisablePagemapScan(t *SoftDirtyTracker) { t.noPagemapScan = true }

// UsesPagemapScan reports whether t uses the PAGEMAP_SCAN ioctl.
func UsesPagemapScan(t *SoftDirtyTracker) bool { return !t.noPagemapScan }
