// Command ax-nova-hook is libvirt's qemu hook on Nova compute hosts,
// installed as /etc/libvirt/hooks/qemu.d/ax (libvirt ≥ 6.5 runs every
// executable there): libvirt runs it as
//
//	ax DOMAIN OPERATION SUBOPERATION EXTRA < domain.xml
//
// and it hands the event and the domain XML to axd
// (POST /v1/hooks/libvirt on axd's socket), which decides what to do
// (ax/daemon: a Nova instance started is protected at its <ax:level>).
//
// It follows libvirt's rules for hooks: it never calls libvirt, prints
// nothing on stdout (for migrate and restore, stdout would replace the
// domain XML), is done within two seconds, and exits 0 whatever happens
// (a failing prepare or start hook would stop the domain from starting).
// When axd cannot be reached in time the event is spooled (nova-hook/spool)
// in /var/lib/ax/hook-spool for axd to replay. What goes wrong is logged
// on stderr and to syslog (daemon facility, tag ax-nova-hook).
//
// For tests, AX_NOVA_HOOK_SOCKET and AX_NOVA_HOOK_SPOOL replace axd's
// socket and the spool directory, and AX_NOVA_HOOK_NO_SYSLOG=1 keeps the
// log on stderr (libvirt passes hooks no such variables).
package main
