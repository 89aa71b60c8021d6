// Command ax-openstack brings up the test cloud of test/openstack in a
// directory and keeps it until it is stopped (SIGINT, SIGTERM): make
// openstack-up and openstack-down.
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/axproject/ax/test/openstack"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "ax-openstack:", err)
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) != 2 {
		return fmt.Errorf("usage: ax-openstack DIR (an empty directory; the cloud's configuration, data and logs)")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	c, err := openstack.Start(ctx, os.Args[1], log.Printf)
	if err != nil {
		return err
	}
	defer c.Close()
	log.Printf("up: OS_CLIENT_CONFIG_FILE=%s OS_CLOUD=ax openstack server list --all-projects; axd --nova-cloud ax --nova-clouds-file %s --nova-host %s",
		c.CloudsYAML(), c.CloudsYAML(), openstack.Host)
	<-ctx.Done()
	log.Printf("stopping")
	return nil
}
