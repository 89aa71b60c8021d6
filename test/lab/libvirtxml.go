package lab

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"strings"
	"text/template"
	"time"

	"github.com/axproject/ax/ax/api"
)

// NovaDomain is a lab guest as a libvirt domain in the shape Nova's libvirt
// driver (Zed, Debian 12's nova 26) writes: Nova's metadata namespace, the
// instance UUID as the domain's and the SMBIOS system UUID, the instance
// name template, an <interface type='ethernet'> on a tap named in advance
// (os-vif's plugging: the lab makes the tap, managed='no'), a file-backed
// console and Nova's clock and balloon. AX's own requirements are added:
// RAM in a shared named file (Nova's [libvirt] file_backed_memory), the
// agent's virtio-serial port, and no guest checksum offload.
type NovaDomain struct {
	Type        string // "qemu" (TCG) or "kvm"
	Name        string // libvirt name (LibvirtDomainName)
	UUID        string // the instance's UUID
	DisplayName string // nova:name, the server's name in Nova
	Flavor      string // default "ax.lab"
	RAMMiB      int
	VCPUs       int
	Kernel      string
	Initrd      string
	Cmdline     string
	Tap         string
	MAC         string
	Console     string    // serial console log file
	Agent       string    // unix socket of the agent's virtio-serial port
	Disk        *api.Disk // vda, when set
	// Incoming makes QEMU wait, paused, for migrate-incoming rather than
	// boot (start it with virsh start --paused): the failover mechanism
	// AX resumes a replica with, spelled as qemu:commandline arguments
	// (see LIBVIRT.md). Like the lab's own QEMU it loads device state
	// saved by xen-save-devices-state: no configuration section, no vmdesc.
	Incoming bool
	Created  time.Time
}

// Fixed identities of the lab's Nova: the Keystone user and project that
// own every lab instance, and the image its root disk would come from.
const (
	novaUserID    = "a7a7a7a7000040008000000000000001"
	novaProjectID = "a7a7a7a7000040008000000000000002"
	novaImageUUID = "a7a7a7a7-0000-4000-8000-000000000001"
	novaVersion   = "26.2.0"
	novaNamespace = "http://openstack.org/xmlns/libvirt/nova/1.1"
)

var novaDomainTmpl = template.Must(template.New("domain").Funcs(template.FuncMap{"x": xmlText}).Parse(
	`<domain type='{{x .Type}}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{{x .Name}}</name>
  <uuid>{{x .UUID}}</uuid>
  <metadata>
    <nova:instance xmlns:nova="` + novaNamespace + `">
      <nova:package version="` + novaVersion + `"/>
      <nova:name>{{x .DisplayName}}</nova:name>
      <nova:creationTime>{{.Created.Format "2006-01-02 15:04:05"}}</nova:creationTime>
      <nova:flavor name="{{x .Flavor}}">
        <nova:memory>{{.RAMMiB}}</nova:memory>
        <nova:disk>{{.DiskGiB}}</nova:disk>
        <nova:swap>0</nova:swap>
        <nova:ephemeral>0</nova:ephemeral>
        <nova:vcpus>{{.VCPUs}}</nova:vcpus>
      </nova:flavor>
      <nova:owner>
        <nova:user uuid="` + novaUserID + `">ax-lab</nova:user>
        <nova:project uuid="` + novaProjectID + `">ax-lab</nova:project>
      </nova:owner>
      <nova:root type="image" uuid="` + novaImageUUID + `"/>
    </nova:instance>
  </metadata>
  <memory unit='KiB'>{{.RAMKiB}}</memory>
  <currentMemory unit='KiB'>{{.RAMKiB}}</currentMemory>
  <memoryBacking>
    <source type='file'/>
    <access mode='shared'/>
  </memoryBacking>
  <vcpu placement='static'>{{.VCPUs}}</vcpu>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>OpenStack Foundation</entry>
      <entry name='product'>OpenStack Nova</entry>
      <entry name='version'>` + novaVersion + `</entry>
      <entry name='serial'>{{x .UUID}}</entry>
      <entry name='uuid'>{{x .UUID}}</entry>
      <entry name='family'>Virtual Machine</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{{x .Kernel}}</kernel>
    <initrd>{{x .Initrd}}</initrd>
    <cmdline>{{x .Cmdline}}</cmdline>
    <smbios mode='sysinfo'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <clock offset='utc'>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{{- with .Disk}}
    <disk type='file' device='disk'>
      <driver name='qemu' type='{{x .Format}}'/>
      <source file='{{x .Path}}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
{{- end}}
    <interface type='ethernet'>
      <mac address='{{x .MAC}}'/>
      <target dev='{{x .Tap}}' managed='no'/>
      <model type='virtio'/>
      <driver>
        <host csum='off'/>
      </driver>
    </interface>
    <serial type='file'>
      <source path='{{x .Console}}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='{{x .Agent}}'/>
      <target type='virtio' name='` + AgentPortName + `'/>
    </channel>
    <memballoon model='virtio'>
      <stats period='10'/>
    </memballoon>
  </devices>
{{- if .Incoming}}
  <qemu:commandline>
    <qemu:arg value='-incoming'/>
    <qemu:arg value='defer'/>
    <qemu:arg value='-machine'/>
    <qemu:arg value='suppress-vmdesc=on'/>
    <qemu:arg value='-global'/>
    <qemu:arg value='migration.send-configuration=off'/>
  </qemu:commandline>
{{- end}}
</domain>
`))

// xmlText escapes s for XML text and attribute values.
func xmlText(s string) (string, error) {
	var b strings.Builder
	if err := xml.EscapeText(&b, []byte(s)); err != nil {
		return "", err
	}
	return b.String(), nil
}

// XML is the domain's libvirt XML.
func (d NovaDomain) XML() (string, error) {
	switch {
	case d.Name == "" || d.UUID == "":
		return "", errors.New("nova domain: name and UUID are required")
	case d.RAMMiB <= 0:
		return "", fmt.Errorf("nova domain %s: RAM %d MiB", d.Name, d.RAMMiB)
	case d.Type != "qemu" && d.Type != "kvm":
		return "", fmt.Errorf("nova domain %s: type %q: use qemu or kvm", d.Name, d.Type)
	case d.Kernel == "" || d.Initrd == "" || d.Tap == "" || d.MAC == "" || d.Console == "" || d.Agent == "":
		return "", fmt.Errorf("nova domain %s: kernel, initrd, tap, MAC, console and agent socket are required", d.Name)
	}
	if d.Flavor == "" {
		d.Flavor = "ax.lab"
	}
	if d.VCPUs == 0 {
		d.VCPUs = 1
	}
	if d.Disk != nil && d.Disk.Format == "" {
		disk := *d.Disk
		disk.Format = "raw"
		d.Disk = &disk
	}
	var diskGiB int64
	if d.Disk != nil {
		diskGiB = 1 // Nova counts whole GiB; the lab's disks are smaller
	}
	var b bytes.Buffer
	err := novaDomainTmpl.Execute(&b, struct {
		NovaDomain
		RAMKiB  int
		DiskGiB int64
	}{d, d.RAMMiB * 1024, diskGiB})
	if err != nil {
		return "", fmt.Errorf("nova domain %s: %w", d.Name, err)
	}
	return b.String(), nil
}
