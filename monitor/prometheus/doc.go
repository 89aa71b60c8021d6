// Package prometheus holds AX's Prometheus alert rules (ax-rules.yml, with
// unit tests in ax-rules.test.yml) and an example scrape configuration
// (prometheus.yml). Its Go tests check them with promtool and check that
// every ax_ metric they and the Grafana dashboards name is one axd exports.
package prometheus
