// Command ax-workload runs the lab guest's workloads (ledger, dirty, tick)
// and, on the client host, the ledger client (client, verify).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/axproject/ax/test/workload"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := workload.Main(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "ax-workload:", err)
		os.Exit(2)
	}
}
