// Package witness decides when a primary fences and a secondary promotes, and
// is the lease server and client of the third-party arbiter (axd --witness).
//
// Hosts hold leases through Leases, which two backends implement: *Client,
// of an axd --witness (Server), and *Etcd, of an etcd cluster named by an
// address etcd://host:port[,host:port...] (ParseEtcdAddr, NewEtcd). With
// etcd the witness is durable and replicated: it survives the loss of a
// minority of its members, keeps its leases across restarts (so no grace
// period follows one), and with no majority answers nothing rather than
// grant a lease it cannot vouch for. Each VM has an etcd lease of its own
// (whole seconds: the TTL is rounded up) bound to the key naming its holder;
// etcd's leader judges expiry. etcd's own access control is the
// authentication: hosts hold leases under the names they give, so only they
// may write under the key prefix (client certificates, EtcdConfig.TLS).
// Run a current etcd release: etcd 3.4.23 (Debian 12, which the tests use)
// predates etcd's fixes for a leader stalled on its disk that went on
// answering keep-alives after losing its leadership (etcd issue 15247).
package witness
