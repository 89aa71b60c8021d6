package daemon

import (
	"context"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/mdlayher/vsock"

	"github.com/axproject/ax/ax/api"
	"github.com/axproject/ax/monitor/agent"
)

// startAgent follows the in-guest agent of a VM running on this host,
// through the virtio-serial port of its QEMU, and carries out its policy.
func (d *Daemon) startAgent(v *vmState) {
	var spec api.VMSpec
	v.set(func(v *vmState) { spec = v.spec })
	if spec.Guest.Agent == "" || d.ctx == nil {
		return
	}
	d.stopAgent(v)
	pol := agent.Policy{}
	if spec.Policy != "" {
		p, err := agent.ParsePolicy(spec.Policy)
		if err != nil {
			d.event(v.name, "agent", fmt.Sprintf("bad policy %q: %v; using notify", spec.Policy, err))
		} else {
			pol = p
		}
	}
	m, err := agent.NewMonitor(agent.Config{
		VM: v.name, Policy: pol, Metrics: d.agentMetrics, Log: d.log.With("vm", v.name),
		Events:   func(kind, text string) { d.event(v.name, kind, text) },
		Actuator: agent.ActuatorFunc(func(a agent.Action) { d.wg.Go(func() { d.agentAction(a) }) }),
	})
	if err != nil {
		d.event(v.name, "agent", "cannot monitor the agent: "+err.Error())
		return
	}
	ctx, cancel := context.WithCancel(d.ctx)
	v.set(func(v *vmState) { v.agent, v.agentCancel = m, cancel })
	d.wg.Add(2)
	go func() {
		defer d.wg.Done()
		m.Run(ctx)
	}()
	go func() {
		defer d.wg.Done()
		m.ServeChardev(ctx, spec.Guest.Agent)
	}()
}

// stopAgent ends the VM's agent monitoring (the VM left this host).
func (d *Daemon) stopAgent(v *vmState) {
	var m *agent.Monitor
	var cancel context.CancelFunc
	v.set(func(v *vmState) { m, cancel, v.agent, v.agentCancel = v.agent, v.agentCancel, nil, nil })
	if cancel != nil {
		cancel()
	}
	if m != nil {
		m.Close()
	}
}

// agentAction carries out what a VM's application policy decided.
func (d *Daemon) agentAction(a agent.Action) {
	v, err := d.vm(a.VM)
	if err != nil {
		return
	}
	switch a.Kind {
	case agent.RestartVM:
		var spec api.VMSpec
		v.set(func(v *vmState) { spec = v.spec })
		cctx, ccancel := context.WithTimeout(d.ctx, 2*time.Second)
		mon, err := d.cfg.Hypervisor.Domain(spec.Guest).Control(cctx)
		ccancel()
		if err == nil {
			ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
			err = mon.Reset(ctx)
			cancel()
			mon.Close()
		}
		if err != nil {
			d.event(a.VM, "app-action", fmt.Sprintf("restart-vm for %s failed: %v", a.Check, err))
			return
		}
		d.event(a.VM, "app-action", fmt.Sprintf("restarted the VM: %s", a.Reason))
	case agent.Failover:
		ctx, cancel := context.WithTimeout(d.ctx, 30*time.Second)
		defer cancel()
		if err := d.plannedFailover(ctx, a.VM); err != nil {
			d.event(a.VM, "app-action", fmt.Sprintf("failover for %s not done: %v", a.Check, err))
			return
		}
		d.event(a.VM, "app-action", fmt.Sprintf("failed over: %s", a.Reason))
	}
}

// agentStatus is the agent part of a VM's status.
func agentStatus(m *agent.Monitor) (string, []api.AppHealth) {
	if m == nil {
		return "none", nil
	}
	st := m.Status()
	state := "not connected"
	switch {
	case st.Connected:
		state = "connected"
	case st.Silent:
		state = "silent"
	}
	var apps []api.AppHealth
	for _, a := range st.Apps {
		apps = append(apps, api.AppHealth{Check: a.Check, Health: fmt.Sprint(a.Health), Since: a.Since, Detail: a.Detail})
	}
	return state, apps
}

// serveVsockAgents accepts agents over AF_VSOCK on port and hands each to
// the monitor of the VM whose QEMU has that guest context ID. Hosts without
// vsock (no vhost_vsock module) serve agents over virtio-serial only.
func (d *Daemon) serveVsockAgents(ctx context.Context, port uint32) {
	// Guests reach the host over vsock only through vhost-vsock; a host
	// without it may still open AF_VSOCK sockets that nobody can reach.
	_, err := os.Stat("/dev/vhost-vsock")
	var ln net.Listener
	if err == nil {
		ln, err = vsock.Listen(port, nil)
	}
	if err != nil {
		d.event("", "agent", fmt.Sprintf("agents over virtio-serial only: no vsock here (%v; try: modprobe vhost_vsock)", err))
		return
	}
	d.event("", "agent", fmt.Sprintf("accepting agents over vsock port %d and virtio-serial", port))
	agent.ServeListener(ctx, ln, func(a net.Addr) *agent.Monitor {
		cid, ok := agent.VsockContextID(a)
		if !ok {
			return nil
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, v := range d.vms {
			v.mu.Lock()
			m, c := v.agent, v.spec.Guest.VsockCID
			v.mu.Unlock()
			if m != nil && c == cid {
				return m
			}
		}
		return nil
	})
}
