package libvirt

import (
	"context"
	"fmt"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// Conn is the part of libvirt's API the driver calls: go-libvirt's
// *Libvirt implements it, and tests give a recording fake.
type Conn interface {
	DomainLookupByName(name string) (golibvirt.Domain, error)
	DomainGetXMLDesc(dom golibvirt.Domain, flags golibvirt.DomainXMLFlags) (string, error)
	DomainGetState(dom golibvirt.Domain, flags uint32) (state int32, reason int32, err error)
	DomainCreate(dom golibvirt.Domain) error
	DomainCreateXML(xml string, flags golibvirt.DomainCreateFlags) (golibvirt.Domain, error)
	// DomainDefineXMLFlags is virDomainDefineXMLFlags: a persistent
	// definition made (or replaced).
	DomainDefineXMLFlags(xml string, flags golibvirt.DomainDefineFlags) (golibvirt.Domain, error)
	DomainDestroy(dom golibvirt.Domain) error
	// QEMUDomainMonitorCommand is virDomainQemuMonitorCommand: one QMP
	// command passed through to the domain's QEMU, its reply returned.
	QEMUDomainMonitorCommand(dom golibvirt.Domain, cmd string, flags uint32) (string, error)
	// LifecycleEvents streams every domain's lifecycle events until ctx
	// ends or the connection is lost, then closes the channel.
	LifecycleEvents(ctx context.Context) (<-chan golibvirt.DomainEventLifecycleMsg, error)
	Disconnect() error
}

var _ Conn = (*golibvirt.Libvirt)(nil)

// Defaults of Config.
const (
	DefaultURI    = "qemu:///system"
	DefaultSocket = "/run/libvirt/libvirt-sock"
)

// dialConn connects to the libvirtd listening on socket and opens uri.
func dialConn(ctx context.Context, socket, uri string) (*golibvirt.Libvirt, error) {
	timeout := 5 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	if timeout <= 0 {
		return nil, fmt.Errorf("libvirt %s: %w", socket, context.DeadlineExceeded)
	}
	l := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket), dialers.WithLocalTimeout(timeout)))
	// The handshake has no deadline of its own: a libvirtd that accepts
	// and never answers is cut off by closing the connection.
	done := make(chan error, 1)
	go func() { done <- l.ConnectToURI(golibvirt.ConnectURI(uri)) }()
	select {
	case err := <-done:
		if err != nil {
			return nil, fmt.Errorf("libvirt %s (%s): %w (is libvirtd running? try: systemctl start libvirtd)", socket, uri, err)
		}
		return l, nil
	case <-ctx.Done():
		l.Disconnect()
		<-done
		return nil, fmt.Errorf("libvirt %s (%s): no answer: %w", socket, uri, ctx.Err())
	}
}

// call runs f, a libvirt RPC, and returns its result or ctx's end,
// whichever comes first. go-libvirt's calls take no context: one that
// libvirtd never answers goes on until the connection closes.
func call[T any](ctx context.Context, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := f()
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}
