package qemu

import (
	"context"
	"encoding/json"
	"fmt"
)

// Block operations for disk replication. The guest's disk node is first
// mirrored (blockdev-mirror, copy-mode write-blocking) to an NBD target that
// axd serves: a full copy, then every guest write reaches axd before the
// guest sees it done. Once in sync, a disk Guest wrapped in a quorum node
// gets the NBD target as a second quorum child instead: writes go to both
// children in parallel and the guest's flushes reach axd, so a write need
// not wait for the partner — a flush does.

// BlockJob is one running block job (query-block-jobs).
type BlockJob struct {
	ID     string `json:"device"`
	Type   string `json:"type"`
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
	Ready  bool   `json:"ready"`
	Status string `json:"status"`
}

// NBDReconnectDelay is how long a request to an NBD target whose server
// went away waits for it to come back before it fails. The server is axd:
// when axd dies, a write or flush to the target must not complete on the
// local disk alone — the partner never gets it, and a guest that saw it
// done could lose it in the failover that follows. Waiting instead gives
// the guard (ax/guard), which stops the guest as soon as axd's pipe
// closes, time to do so with the request still pending, so the guest never
// sees it done. A restarted axd that finds a target left behind removes it,
// which waits out this delay at most; an axd that stops cleanly removes
// its targets first.
const NBDReconnectDelay = 5 // seconds

// AddNBDTarget adds a block node reading and writing export on the NBD
// server at socket (a unix socket path). Requests wait up to
// NBDReconnectDelay for a server that went away.
func (q *QMP) AddNBDTarget(ctx context.Context, node, socket, export string) error {
	_, err := q.run(ctx, "blockdev-add", map[string]any{
		"driver": "nbd", "node-name": node,
		"server":          map[string]any{"type": "unix", "path": socket},
		"export":          export,
		"reconnect-delay": NBDReconnectDelay,
	})
	return err
}

// AddNullNode adds a block node of size bytes that discards what is
// written to it (null-co): a stand-in target for measuring what QEMU's side
// of replication costs.
func (q *QMP) AddNullNode(ctx context.Context, node string, size int64) error {
	_, err := q.run(ctx, "blockdev-add", map[string]any{"driver": "null-co", "node-name": node, "size": size})
	return err
}

// DeleteNode removes a block node nothing uses any more.
func (q *QMP) DeleteNode(ctx context.Context, node string) error {
	_, err := q.run(ctx, "blockdev-del", map[string]any{"node-name": node})
	return err
}

// Mirror starts job mirroring device's content to target: a full copy,
// then every guest write goes to both before it completes (write-blocking),
// so the target never lags the guest once the job is ready. A target error
// ends the job (reported), it never pauses the guest.
func (q *QMP) Mirror(ctx context.Context, job, device, target string) error {
	_, err := q.run(ctx, "blockdev-mirror", map[string]any{
		"job-id": job, "device": device, "target": target,
		"sync": "full", "copy-mode": "write-blocking",
		"on-source-error": "report", "on-target-error": "report",
	})
	return err
}

// BlockJobs lists the running block jobs.
func (q *QMP) BlockJobs(ctx context.Context) ([]BlockJob, error) {
	out, err := q.run(ctx, "query-block-jobs", nil)
	if err != nil {
		return nil, err
	}
	var r struct {
		Return []BlockJob `json:"return"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return nil, fmt.Errorf("qmp query-block-jobs: %w", err)
	}
	return r.Return, nil
}

// CancelJob ends a block job. Cancelling a ready mirror completes it without
// switching the guest to the target: the guest keeps its own disk.
func (q *QMP) CancelJob(ctx context.Context, job string, force bool) error {
	_, err := q.run(ctx, "block-job-cancel", map[string]any{"device": job, "force": force})
	return err
}

// blockNode is one entry of query-named-block-nodes.
type blockNode struct {
	NodeName string `json:"node-name"`
	Driver   string `json:"drv"`
	Image    struct {
		VirtualSize int64 `json:"virtual-size"`
	} `json:"image"`
}

// node returns what QEMU says of one block node.
func (q *QMP) node(ctx context.Context, name string) (blockNode, error) {
	out, err := q.run(ctx, "query-named-block-nodes", map[string]any{"flat": true})
	if err != nil {
		return blockNode{}, err
	}
	var r struct {
		Return []blockNode `json:"return"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return blockNode{}, fmt.Errorf("qmp query-named-block-nodes: %w", err)
	}
	for _, n := range r.Return {
		if n.NodeName == name {
			return n, nil
		}
	}
	return blockNode{}, fmt.Errorf("qmp: no block node %q (the guest's disks must be -blockdev nodes with node-name)", name)
}

// NodeSize returns the virtual size of a block node (what the guest sees).
func (q *QMP) NodeSize(ctx context.Context, node string) (int64, error) {
	n, err := q.node(ctx, node)
	return n.Image.VirtualSize, err
}

// NodeDriver returns the block driver of a node: quorum for a disk Guest
// set up, raw or qcow2 for one attached straight to its format.
func (q *QMP) NodeDriver(ctx context.Context, node string) (string, error) {
	n, err := q.node(ctx, node)
	return n.Driver, err
}

// AddQuorumChild makes node another child of the quorum node parent: from
// then on every write to parent goes to node too, in parallel with the
// other children, and so does every flush. With vote-threshold 1 a failing
// child does not fail the guest's request (QEMU reports it with a
// QUORUM_REPORT_BAD event).
func (q *QMP) AddQuorumChild(ctx context.Context, parent, node string) error {
	_, err := q.run(ctx, "x-blockdev-change", map[string]any{"parent": parent, "node": node})
	return err
}

// RemoveQuorumChild detaches node from the quorum node parent; it does
// nothing when node is not a child of parent.
func (q *QMP) RemoveQuorumChild(ctx context.Context, parent, node string) error {
	// x-blockdev-change names a child by its edge (children.N), which only
	// the block graph tells.
	out, err := q.run(ctx, "x-debug-query-block-graph", nil)
	if err != nil {
		return err
	}
	var r struct {
		Return struct {
			Nodes []struct {
				ID   int    `json:"id"`
				Name string `json:"name"`
			} `json:"nodes"`
			Edges []struct {
				Parent int    `json:"parent"`
				Child  int    `json:"child"`
				Name   string `json:"name"`
			} `json:"edges"`
		} `json:"return"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return fmt.Errorf("qmp x-debug-query-block-graph: %w", err)
	}
	ids := map[string]int{}
	for _, n := range r.Return.Nodes {
		ids[n.Name] = n.ID
	}
	pid, ok1 := ids[parent]
	cid, ok2 := ids[node]
	if !ok1 || !ok2 {
		return nil
	}
	for _, e := range r.Return.Edges {
		if e.Parent == pid && e.Child == cid {
			_, err := q.run(ctx, "x-blockdev-change", map[string]any{"parent": parent, "child": e.Name})
			return err
		}
	}
	return nil
}
