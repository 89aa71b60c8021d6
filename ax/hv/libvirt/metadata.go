package libvirt

import (
	"encoding/xml"
	"fmt"
	"strings"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/ax/names"
)

// Namespaces of the <metadata> elements AX reads.
const (
	NovaNamespace = "http://openstack.org/xmlns/libvirt/nova/1.1"
	// AXNamespace is AX's own: <ax:level peer='HOST'>ft</ax:level>, set
	// with virsh metadata DOMAIN --uri AXNamespace --key ax
	// --set "<level peer='b'>ft</level>".
	AXNamespace = "https://axproject.github.io/xmlns/ax/1"
)

// NovaInstance is the <nova:instance> element Nova's libvirt driver
// writes into each domain's metadata. The instance's UUID is the domain's.
type NovaInstance struct {
	Name         string     `json:"name"`
	CreationTime string     `json:"creation_time,omitempty"`
	Package      string     `json:"package,omitempty"` // Nova's version
	Flavor       NovaFlavor `json:"flavor"`
	User         NovaOwner  `json:"user"`
	Project      NovaOwner  `json:"project"`
	// Root is what the instance booted from: an image, or a volume.
	Root NovaRoot `json:"root"`
}

// NovaFlavor is the flavor the instance was built with.
type NovaFlavor struct {
	Name         string `json:"name"`
	MemoryMiB    int    `json:"memory_mib"`
	DiskGiB      int    `json:"disk_gib"`
	SwapMiB      int    `json:"swap_mib"`
	EphemeralGiB int    `json:"ephemeral_gib"`
	VCPUs        int    `json:"vcpus"`
}

// NovaOwner is a Keystone user or project: its name and UUID.
type NovaOwner struct {
	UUID string `xml:"uuid,attr" json:"uuid"`
	Name string `xml:",chardata" json:"name"`
}

// NovaRoot is the instance's root disk source.
type NovaRoot struct {
	Type string `xml:"type,attr" json:"type"` // image or volume
	UUID string `xml:"uuid,attr" json:"uuid"`
}

// metadataDoc is <metadata>'s children, each in its own namespace.
type metadataDoc struct {
	Nova []novaInstanceXML `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 instance"`
	AX   []axLevelXML      `xml:"https://axproject.github.io/xmlns/ax/1 level"`
}

type novaInstanceXML struct {
	Name         string `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 name"`
	CreationTime string `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 creationTime"`
	Package      struct {
		Version string `xml:"version,attr"`
	} `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 package"`
	Flavor struct {
		Name      string `xml:"name,attr"`
		Memory    string `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 memory"`
		Disk      string `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 disk"`
		Swap      string `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 swap"`
		Ephemeral string `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 ephemeral"`
		VCPUs     string `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 vcpus"`
	} `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 flavor"`
	Owner struct {
		User    NovaOwner `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 user"`
		Project NovaOwner `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 project"`
	} `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 owner"`
	Root NovaRoot `xml:"http://openstack.org/xmlns/libvirt/nova/1.1 root"`
}

type axLevelXML struct {
	Peer  string `xml:"peer,attr"`
	Level string `xml:",chardata"`
}

// Bounds of the metadata strings AX keeps.
const maxMetaLen = 255

// metadata reads Nova's and AX's elements from <metadata>'s inner XML.
// Nova's strings are kept only when printable (they are shown, never
// used as paths or arguments); AX's level and peer must be valid.
func (d *Discovered) metadata(inner string) *Refusal {
	var doc metadataDoc
	if err := xml.Unmarshal([]byte("<metadata>"+inner+"</metadata>"), &doc); err != nil {
		return &Refusal{What: "metadata", Reason: fmt.Sprintf("unreadable <metadata>: %v", err)}
	}
	if len(doc.Nova) > 0 {
		n := doc.Nova[0]
		var err error
		num := func(what, s string) int {
			v, e := parseCount(s)
			if e != nil && err == nil {
				err = fmt.Errorf("nova:%s %q: %w", what, text(s), e)
			}
			return v
		}
		inst := &NovaInstance{
			Name: text(n.Name), CreationTime: text(n.CreationTime), Package: text(n.Package.Version),
			Flavor: NovaFlavor{
				Name: text(n.Flavor.Name), MemoryMiB: num("memory", n.Flavor.Memory), DiskGiB: num("disk", n.Flavor.Disk),
				SwapMiB: num("swap", n.Flavor.Swap), EphemeralGiB: num("ephemeral", n.Flavor.Ephemeral), VCPUs: num("vcpus", n.Flavor.VCPUs),
			},
			User:    NovaOwner{UUID: uuid(n.Owner.User.UUID), Name: text(n.Owner.User.Name)},
			Project: NovaOwner{UUID: uuid(n.Owner.Project.UUID), Name: text(n.Owner.Project.Name)},
			Root:    NovaRoot{Type: text(n.Root.Type), UUID: uuid(n.Root.UUID)},
		}
		if err != nil {
			return &Refusal{What: "metadata", Reason: err.Error()}
		}
		d.Nova = inst
	}
	if len(doc.AX) > 0 {
		a := doc.AX[0]
		level := strings.TrimSpace(a.Level)
		switch level {
		case api.LevelNone, api.LevelHA, api.LevelFT:
		default:
			return &Refusal{What: "metadata", Reason: fmt.Sprintf("<ax:level> %q", text(level)), Fix: "set <ax:level> to none, ha or ft"}
		}
		if a.Peer != "" {
			if err := names.Check("host", a.Peer); err != nil {
				return &Refusal{What: "metadata", Reason: fmt.Sprintf("<ax:level peer=…>: %v", err)}
			}
		}
		d.Level, d.Peer = level, a.Peer
	}
	return nil
}

// parseCount reads a non-negative count ("" is 0).
func parseCount(s string) (int, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, nil
	}
	var v int
	for _, c := range s {
		if c < '0' || c > '9' || v > 1<<40 {
			return 0, fmt.Errorf("not a count")
		}
		v = v*10 + int(c-'0')
	}
	return v, nil
}

// text is s trimmed, or "" if it is long or has anything but printable
// ASCII and spaces: Nova's names are shown to operators, never trusted.
func text(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > maxMetaLen {
		return ""
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return ""
		}
	}
	return s
}

// uuid is s if it is a UUID written as Nova and Keystone do (hex digits,
// maybe with dashes), else "".
func uuid(s string) string {
	if len(s) != 32 && len(s) != 36 {
		return ""
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' || c == '-') {
			return ""
		}
	}
	return s
}
