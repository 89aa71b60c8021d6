// Package witness decides when a primary fences and a secondary promotes, and
// is the lease server and client of the third-party arbiter (axd --witness).
package witness
