// Package reserve is the partner host's book of the capacity it has promised
// to run guests with after a failover, so it does not promise more than it has.
package reserve
