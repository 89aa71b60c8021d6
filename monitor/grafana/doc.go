// Package grafana holds AX's Grafana dashboards (dashboards/*.json, Grafana
// 9+ schema: an overview of all protected VMs and a drill-down templated by
// VM, both with a host variable) and the provisioning files that load them
// (provisioning/). Its tests check the dashboards' structure; monitor/prometheus
// checks their queries and metric names.
package grafana
