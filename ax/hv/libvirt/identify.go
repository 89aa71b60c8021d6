package libvirt

import (
	"fmt"

	"libvirt.org/go/libvirtxml"

	"github.com/axproject/ax/ax/names"
)

// Identity is who a domain is and what protection its metadata asks for,
// as any domain XML tells it, running or not: what a libvirt hook needs at
// every operation, where Inspect needs a running, protectable domain.
type Identity struct {
	// Name is the domain's name, a valid VM name.
	Name string
	// UUID is the domain's (Nova's instance UUID), "" if absent.
	UUID string
	// Running says whether the XML is a running domain's (it has an id).
	Running bool
	// Nova is Nova's metadata, nil for a domain Nova did not create.
	Nova *NovaInstance
	// Level and Peer are from <ax:level peer=…>, "" without one.
	Level, Peer string
}

// Identify reads a domain XML's name, UUID and metadata (Nova's and AX's),
// with the checks Inspect makes of them. An error is a *Refusal.
func Identify(xml []byte) (*Identity, error) {
	var dom libvirtxml.Domain
	if err := unmarshal(xml, &dom); err != nil {
		return nil, &Refusal{Domain: "?", What: "xml", Reason: fmt.Sprintf("unreadable domain XML: %v", err)}
	}
	if err := names.Check("vm", dom.Name); err != nil {
		return nil, &Refusal{Domain: printable(dom.Name), What: "name", Reason: err.Error(),
			Fix: "rename the domain (virsh domrename) to letters, digits, '.', '_' and '-'"}
	}
	id := &Identity{Name: dom.Name, UUID: uuid(dom.UUID), Running: dom.ID != nil && *dom.ID > 0}
	if dom.Metadata != nil {
		var d Discovered
		if r := d.metadata(dom.Metadata.XML); r != nil {
			r.Domain = dom.Name
			return nil, r
		}
		id.Nova, id.Level, id.Peer = d.Nova, d.Level, d.Peer
	}
	return id, nil
}
