package qemu

import (
	"context"
	"encoding/json"
	"fmt"
)

// Block operations for disk replication: the guest's disk node is mirrored
// (blockdev-mirror, copy-mode write-blocking) to an NBD target that axd
// serves, so every guest write reaches axd before the guest sees it done.

// BlockJob is one running block job (query-block-jobs).
type BlockJob struct {
	ID     string `json:"device"`
	Type   string `json:"type"`
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
	Ready  bool   `json:"ready"`
	Status string `json:"status"`
}

// AddNBDTarget adds a block node reading and writing export on the NBD
// server at socket (a unix socket path).
func (q *QMP) AddNBDTarget(ctx context.Context, node, socket, export string) error {
	_, err := q.run(ctx, "blockdev-add", map[string]any{
		"driver": "nbd", "node-name": node,
		"server": map[string]any{"type": "unix", "path": socket},
		"export": export,
	})
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

// NodeSize returns the virtual size of a block node (what the guest sees).
func (q *QMP) NodeSize(ctx context.Context, node string) (int64, error) {
	out, err := q.run(ctx, "query-named-block-nodes", map[string]any{"flat": true})
	if err != nil {
		return 0, err
	}
	var r struct {
		Return []struct {
			NodeName string `json:"node-name"`
			Image    struct {
				VirtualSize int64 `json:"virtual-size"`
			} `json:"image"`
		} `json:"return"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return 0, fmt.Errorf("qmp query-named-block-nodes: %w", err)
	}
	for _, n := range r.Return {
		if n.NodeName == node {
			return n.Image.VirtualSize, nil
		}
	}
	return 0, fmt.Errorf("qmp: no block node %q (the guest's disks must be -blockdev nodes with node-name)", node)
}
