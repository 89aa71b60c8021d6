package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/axproject/ax/ax/daemon"
	"github.com/axproject/ax/ax/names"
	"github.com/axproject/ax/nova-hook/nova"
)

// novaFlags make axd take its VMs' levels from Nova.
type novaFlags struct {
	cloud, file, host, adopt string
	poll, resync             time.Duration
	placement                bool
}

func (f *novaFlags) add(fs *flag.FlagSet) {
	fs.StringVar(&f.cloud, "nova-cloud", os.Getenv("OS_CLOUD"), "take this host's VMs' levels from Nova: the cloud's name in clouds.yaml (default $OS_CLOUD; none: levels from the domains' <ax:level>). "+
		"Its user needs an admin role (the servers of a host, all projects)")
	fs.StringVar(&f.file, "nova-clouds-file", "", "with --nova-cloud: the clouds.yaml to read (default: $OS_CLIENT_CONFIG_FILE, else ./clouds.yaml, ~/.config/openstack/clouds.yaml, /etc/openstack/clouds.yaml)")
	fs.StringVar(&f.host, "nova-host", "", "with --nova-cloud: this compute host's name in Nova, nova.conf's [DEFAULT] host (default --host)")
	fs.DurationVar(&f.poll, "nova-poll", 3*time.Second, "with --nova-cloud: how often Nova is asked what changed (changes-since)")
	fs.StringVar(&f.adopt, "nova-adopt-dir", "", "with --nova-cloud: where axd marks the instances it promoted here for the adopting compute driver (nova-hook/driver), a file per instance UUID; the driver's [ax] adopt_dir (default STATE-DIR/nova-adopt)")
	fs.DurationVar(&f.resync, "nova-resync", time.Minute, "with --nova-cloud: how often every server of this host is read again and refused or failed levels retried")
	fs.BoolVar(&f.placement, "nova-placement", true, "with --nova-cloud: hold the capacity this host promised its partners' VMs in Placement, so that Nova's scheduler counts it (an allocation per VM against this host's compute node, consumer type "+nova.ReservationType+")")
}

// config is the daemon's Nova configuration, nil without --nova-cloud.
func (f *novaFlags) config() (*daemon.NovaConfig, error) {
	if f.cloud == "" {
		if f.file != "" || f.host != "" || f.adopt != "" {
			return nil, fmt.Errorf("--nova-clouds-file, --nova-host and --nova-adopt-dir need --nova-cloud NAME (or OS_CLOUD)")
		}
		return nil, nil
	}
	if f.host != "" {
		if err := names.Check("host", f.host); err != nil {
			return nil, fmt.Errorf("--nova-host: %w", err)
		}
	}
	if f.adopt != "" {
		if err := names.CheckPath("adopt directory", f.adopt); err != nil {
			return nil, fmt.Errorf("--nova-adopt-dir: %w", err)
		}
	}
	if f.poll < time.Second || f.poll > 10*time.Minute {
		return nil, fmt.Errorf("--nova-poll %s out of range [1s, 10m]", f.poll)
	}
	if f.resync < f.poll {
		return nil, fmt.Errorf("--nova-resync %s is shorter than --nova-poll %s", f.resync, f.poll)
	}
	cl, err := nova.New(nova.Config{Cloud: f.cloud, CloudsFile: f.file})
	if err != nil {
		return nil, fmt.Errorf("--nova-cloud: %w", err)
	}
	return &daemon.NovaConfig{Cloud: cl, Host: f.host, Poll: f.poll, Resync: f.resync, AdoptDir: f.adopt, NoPlacement: !f.placement}, nil
}
