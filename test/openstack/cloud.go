// Package openstack brings up a real, small OpenStack (Debian 12's Zed:
// MariaDB, RabbitMQ, Keystone, Placement, Glance, Nova with its fake
// compute driver, or compute hosts with its libvirt driver against the
// lab's libvirtds) on loopback, as processes it starts and stops by PID,
// so AX's Nova client and axd are tested against the real APIs.
package openstack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"text/template"
	"time"
)

// Commands are the programs a cloud runs (deps.sh installs them).
var Commands = []string{"mariadbd", "mariadb-install-db", "mariadb", "/usr/lib/rabbitmq/bin/rabbitmq-server", "epmd", "uwsgi", "keystone-manage", "keystone-wsgi-public", "placement-api", "placement-manage", "openstack"}

// PythonModules are the Python packages whose entry points the cloud runs.
var PythonModules = []string{"nova", "glance", "keystone", "placement", "pymysql"}

// Password is every password of the cloud (MariaDB's user, Keystone's
// admin and ax users): it listens on loopback only and lives for a test.
const Password = "ax-openstack-test"

// Host is the Nova compute host's name (nova.conf [DEFAULT] host), the
// name axd runs with.
const Host = "a"

// Cloud is a running OpenStack. Close stops every process it started.
type Cloud struct {
	// Dir holds its configuration, data and logs (DIR/log/NAME.log).
	Dir string
	// Ports of the services, on 127.0.0.1.
	DB, Rabbit, EPMD, Dist, Keystone, Placement, Glance, Nova, Neutron int

	neutron *neutron
	opts    Options

	log func(format string, a ...any)

	mu      sync.Mutex
	procs   []*proc
	stopped []*proc // by Stop, for Restart
}

// proc is a process the cloud started, in its own process group.
type proc struct {
	name string
	env  []string
	argv []string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// AuthURL is Keystone's identity endpoint.
func (c *Cloud) AuthURL() string { return fmt.Sprintf("http://127.0.0.1:%d/v3", c.Keystone) }

// CloudsYAML is the clouds.yaml (cloud "ax": user ax, admin role) written
// in Dir.
func (c *Cloud) CloudsYAML() string { return filepath.Join(c.Dir, "clouds.yaml") }

// Options change what StartWith brings up.
type Options struct {
	// NoFakeCompute leaves out the nova-compute with the fake driver on
	// host a: the caller starts compute hosts of its own afterwards
	// (StartLibvirtCompute).
	NoFakeCompute bool
	// Neutron runs Neutron's server (ML2, flat provider networks, Linux
	// bridge mechanism) instead of the stand-in that answers Nova with
	// empty lists: compute hosts then start a Linux bridge agent each
	// (StartNeutronAgent) and servers boot with ports.
	Neutron bool
}

// Start brings a cloud up in dir (made if missing; it should be empty).
// logf reports its progress. On error what was started is stopped.
func Start(ctx context.Context, dir string, logf func(format string, a ...any)) (*Cloud, error) {
	return StartWith(ctx, dir, logf, Options{})
}

// StartWith is Start with options.
func StartWith(ctx context.Context, dir string, logf func(format string, a ...any), opts Options) (_ *Cloud, err error) {
	c := &Cloud{Dir: dir, log: logf, opts: opts}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	ports, err := freePorts(8)
	if err != nil {
		return nil, err
	}
	if opts.Neutron {
		more, err := freePorts(1)
		if err != nil {
			return nil, err
		}
		c.Neutron = more[0]
	} else if c.neutron, c.Neutron, err = startNeutron(); err != nil {
		return nil, err
	}
	c.DB, c.Rabbit, c.EPMD, c.Dist, c.Keystone, c.Placement, c.Glance, c.Nova = ports[0], ports[1], ports[2], ports[3], ports[4], ports[5], ports[6], ports[7]
	for _, d := range []string{"log", "bin", "mysql", "rabbitmq", "keystone", "placement", "glance/images", "nova/instances", "nova/lock", "neutron/lock"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return nil, err
		}
	}
	if err := c.writeConfig(); err != nil {
		return nil, err
	}
	start := time.Now()
	var wg sync.WaitGroup
	var rabbitErr error
	wg.Add(1)
	go func() { defer wg.Done(); rabbitErr = c.startRabbit(ctx) }()
	if err := c.startDB(ctx); err != nil {
		wg.Wait()
		return nil, err
	}
	c.log("mariadb up (%s)", time.Since(start).Round(time.Second))
	if err := c.startKeystone(ctx); err != nil {
		wg.Wait()
		return nil, err
	}
	c.log("keystone up (%s)", time.Since(start).Round(time.Second))
	// The schemas, each a few seconds to a minute of Python: side by side.
	errs := make([]error, 4)
	wg.Add(3)
	go func() { defer wg.Done(); errs[0] = c.startPlacement(ctx) }()
	go func() { defer wg.Done(); errs[1] = c.startGlance(ctx) }()
	go func() { defer wg.Done(); errs[2] = c.syncNova(ctx) }()
	if opts.Neutron {
		wg.Add(1)
		go func() { defer wg.Done(); errs[3] = c.syncNeutron(ctx) }()
	}
	wg.Wait()
	if err := errors.Join(append(errs, rabbitErr)...); err != nil {
		return nil, err
	}
	c.log("rabbitmq, placement, glance up, the databases made (%s)", time.Since(start).Round(time.Second))
	if opts.Neutron {
		if err := c.startNeutronServer(ctx); err != nil {
			return nil, err
		}
		c.log("neutron-server up (%s)", time.Since(start).Round(time.Second))
	}
	if err := c.startNova(ctx); err != nil {
		return nil, err
	}
	if opts.NoFakeCompute {
		c.log("nova up, no compute host yet (%s)", time.Since(start).Round(time.Second))
	} else {
		c.log("nova up, compute host %s mapped (%s)", Host, time.Since(start).Round(time.Second))
	}
	return c, nil
}

// Close stops every process the cloud started, last started first: its
// process group is sent SIGTERM, then SIGKILL after 15 s. Safe twice.
func (c *Cloud) Close() error {
	c.mu.Lock()
	procs := c.procs
	c.procs = nil
	c.mu.Unlock()
	start := time.Now()
	defer func() {
		if len(procs) > 0 {
			c.log("cloud stopped in %s", time.Since(start).Round(100*time.Millisecond))
		}
	}()
	for i := len(procs) - 1; i >= 0; i-- {
		if p := procs[i]; !p.end(15 * time.Second) {
			c.log("%s (pid %d) did not end within 15 s of SIGTERM: SIGKILL", p.name, p.cmd.Process.Pid)
		}
	}
	if c.neutron != nil {
		c.neutron.Close()
	}
	return nil
}

// NeutronAsked is what Nova asked the stand-in for Neutron ("METHOD
// PATH": times); nil with Options.Neutron, when the real one runs.
func (c *Cloud) NeutronAsked() map[string]int {
	if c.neutron == nil {
		return nil
	}
	return c.neutron.Asked()
}

// start runs argv as service name, in its own process group, its output
// in DIR/log/NAME.log.
func (c *Cloud) start(name string, env []string, argv ...string) error {
	out, err := os.OpenFile(filepath.Join(c.Dir, "log", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = c.Dir
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, env: env, argv: argv, cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	c.log("started %s (pid %d)", name, cmd.Process.Pid)
	return nil
}

// Kill ends service name at once (SIGKILL to its process group), as its
// host's death would: e.g. a compute host's nova-compute. Restart starts
// it again.
func (c *Cloud) Kill(name string) error { return c.end(name, 0, "killed") }

// Stop stops service name as Close does (SIGTERM to its process group,
// SIGKILL after 15 s); Restart starts it again as it was.
func (c *Cloud) Stop(name string) error { return c.end(name, 15*time.Second, "stopped") }

// end ends service name (proc.end) and keeps it for Restart.
func (c *Cloud) end(name string, grace time.Duration, did string) error {
	c.mu.Lock()
	p := take(&c.procs, name)
	c.mu.Unlock()
	if p == nil {
		return fmt.Errorf("no service %s runs", name)
	}
	p.end(grace)
	c.mu.Lock()
	c.stopped = append(c.stopped, p)
	c.mu.Unlock()
	c.log("%s %s (pid %d)", did, name, p.cmd.Process.Pid)
	return nil
}

// end sends p's process group SIGTERM, then SIGKILL after grace (at once
// when grace is 0), and waits for p; whatever p left in its group
// (erlang's helpers, uwsgi's workers) is killed too. It says whether p
// ended within grace.
func (p *proc) end(grace time.Duration) bool {
	pgid := p.cmd.Process.Pid
	ended := true
	if grace > 0 {
		syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(grace):
			ended = false
		}
	}
	syscall.Kill(-pgid, syscall.SIGKILL)
	<-p.done
	syscall.Kill(-pgid, syscall.SIGKILL)
	return ended
}

// take removes the proc named name from list and returns it (nil: none).
func take(list *[]*proc, name string) *proc {
	for i, p := range *list {
		if p.name == name {
			*list = append((*list)[:i:i], (*list)[i+1:]...)
			return p
		}
	}
	return nil
}

// Restart starts service name, stopped by Stop or Kill, again.
func (c *Cloud) Restart(name string) error {
	c.mu.Lock()
	p := take(&c.stopped, name)
	c.mu.Unlock()
	if p == nil {
		return fmt.Errorf("service %s was not stopped", name)
	}
	return c.start(name, p.env, p.argv...)
}

// StartCompute starts one more nova-compute, as host host, with
// nova.conf and extra (more nova.conf, laid over it, starting in
// [DEFAULT]), run by script ("": Nova's own nova-compute); it is service
// nova-compute-HOST. It returns once the host is mapped.
func (c *Cloud) StartCompute(ctx context.Context, host, script, extra string) error {
	conf := filepath.Join(c.Dir, "nova", "nova-"+host+".conf")
	if err := os.WriteFile(conf, []byte("[DEFAULT]\nhost = "+host+"\n"+extra), 0o600); err != nil {
		return err
	}
	if script == "" {
		script = c.script("nova-compute")
	}
	name := "nova-compute-" + host
	if err := c.start(name, nil, script, "--config-file", filepath.Join(c.Dir, "nova", "nova.conf"), "--config-file", conf); err != nil {
		return err
	}
	return c.waitMapped(ctx, name, host)
}

// waitMapped maps host's compute node once its nova-compute (service
// name) made its record.
func (c *Cloud) waitMapped(ctx context.Context, name, host string) error {
	return c.wait(ctx, name, 3*time.Minute, func() bool {
		out, err := c.novaManage(ctx, "cell_v2", "discover_hosts", "--verbose")
		if err != nil {
			return false
		}
		out, err = c.novaManage(ctx, "cell_v2", "list_hosts")
		return err == nil && strings.Contains(out, " "+host+" ")
	})
}

// ended says whether service name ended, and how.
func (c *Cloud) ended(name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.procs {
		if p.name != name {
			continue
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s ended: %v (see %s)", name, p.err, filepath.Join(c.Dir, "log", name+".log"))
		default:
		}
	}
	return nil
}

// run runs a one-shot command to its end; its output goes to
// DIR/log/NAME.log and the error quotes its end.
func (c *Cloud) run(ctx context.Context, name string, env []string, argv ...string) (string, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = c.Dir
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err := cmd.Run()
	if f, ferr := os.OpenFile(filepath.Join(c.Dir, "log", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); ferr == nil {
		fmt.Fprintf(f, "$ %s\n%s\n", strings.Join(argv, " "), buf.Bytes())
		f.Close()
	}
	if err != nil {
		return buf.String(), fmt.Errorf("%s: %w: %s", name, err, tail(buf.String(), 1500))
	}
	return buf.String(), nil
}

// wait polls ready until it says yes, service name ends, or timeout.
func (c *Cloud) wait(ctx context.Context, name string, timeout time.Duration, ready func() bool) error {
	deadline := time.Now().Add(timeout)
	for !ready() {
		if err := c.ended(name); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not ready within %s (see %s)", name, timeout, filepath.Join(c.Dir, "log", name+".log"))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	return nil
}

func (c *Cloud) startDB(ctx context.Context) error {
	if _, err := c.run(ctx, "mariadb-install-db", nil, "mariadb-install-db", "--no-defaults", "--user=root",
		"--datadir="+filepath.Join(c.Dir, "mysql"), "--auth-root-authentication-method=socket", "--skip-test-db"); err != nil {
		return err
	}
	if err := c.start("mariadb", nil, "mariadbd", "--defaults-file="+filepath.Join(c.Dir, "my.cnf"), "--user=root"); err != nil {
		return err
	}
	if err := c.wait(ctx, "mariadb", time.Minute, func() bool { return dial(c.DB) }); err != nil {
		return err
	}
	_, err := c.run(ctx, "mariadb-setup", nil, "mariadb", "--no-defaults", "--socket="+filepath.Join(c.Dir, "mysql.sock"), "-u", "root", "-e", render(dbSQL, c))
	return err
}

func (c *Cloud) rabbitEnv() []string {
	r := filepath.Join(c.Dir, "rabbitmq")
	return []string{
		"HOME=" + r, // its erlang cookie
		"RABBITMQ_NODENAME=axos@localhost",
		"RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
		fmt.Sprintf("RABBITMQ_NODE_PORT=%d", c.Rabbit),
		fmt.Sprintf("RABBITMQ_DIST_PORT=%d", c.Dist),
		fmt.Sprintf("ERL_EPMD_PORT=%d", c.EPMD),
		"ERL_EPMD_ADDRESS=127.0.0.1",
		"RABBITMQ_MNESIA_BASE=" + filepath.Join(r, "mnesia"),
		"RABBITMQ_LOG_BASE=" + filepath.Join(r, "log"),
		"RABBITMQ_PID_FILE=" + filepath.Join(r, "pid"),
		"RABBITMQ_CONFIG_FILE=" + filepath.Join(r, "rabbitmq"),
		"RABBITMQ_ENABLED_PLUGINS_FILE=" + filepath.Join(r, "enabled_plugins"),
		"RABBITMQ_CONF_ENV_FILE=" + filepath.Join(r, "rabbitmq-env.conf"),
		"RABBITMQ_LOGS=-",
	}
}

// startRabbit starts epmd first, in the foreground on its own port, so
// that Erlang does not start a detached one.
func (c *Cloud) startRabbit(ctx context.Context) error {
	env := c.rabbitEnv()
	if err := c.start("epmd", env, "epmd", "-address", "127.0.0.1", "-port", fmt.Sprint(c.EPMD)); err != nil {
		return err
	}
	if err := c.wait(ctx, "epmd", 10*time.Second, func() bool { return dial(c.EPMD) }); err != nil {
		return err
	}
	if err := c.start("rabbitmq", env, "/usr/lib/rabbitmq/bin/rabbitmq-server"); err != nil {
		return err
	}
	return c.wait(ctx, "rabbitmq", 2*time.Minute, func() bool { return dial(c.Rabbit) })
}

// uwsgi serves a WSGI script with one process on port.
func (c *Cloud) uwsgi(name, script string, port int, env []string) error {
	return c.start(name, env, "uwsgi", "--plugin", "python3", "--http11-socket", fmt.Sprintf("127.0.0.1:%d", port),
		"--wsgi-file", script, "--processes", "1", "--threads", "4", "--master", "--die-on-term", "--need-app",
		"--enable-threads", "--thunder-lock", "--lazy-apps")
}

func (c *Cloud) startKeystone(ctx context.Context) error {
	conf := filepath.Join(c.Dir, "keystone", "keystone.conf")
	manage := func(args ...string) error {
		_, err := c.run(ctx, "keystone-manage", nil, append([]string{"keystone-manage", "--config-file", conf}, args...)...)
		return err
	}
	for _, args := range [][]string{
		{"db_sync"},
		{"fernet_setup", "--keystone-user", "root", "--keystone-group", "root"},
		{"credential_setup", "--keystone-user", "root", "--keystone-group", "root"},
		{"bootstrap", "--bootstrap-password", Password, "--bootstrap-username", "admin", "--bootstrap-project-name", "admin",
			"--bootstrap-role-name", "admin", "--bootstrap-service-name", "keystone", "--bootstrap-region-id", "RegionOne",
			"--bootstrap-admin-url", c.AuthURL(), "--bootstrap-public-url", c.AuthURL(), "--bootstrap-internal-url", c.AuthURL()},
	} {
		if err := manage(args...); err != nil {
			return err
		}
	}
	if err := c.uwsgi("keystone", "/usr/bin/keystone-wsgi-public", c.Keystone, []string{"OS_KEYSTONE_CONFIG_FILES=" + conf}); err != nil {
		return err
	}
	if err := c.wait(ctx, "keystone", time.Minute, func() bool { return answers(c.AuthURL()) }); err != nil {
		return err
	}
	return c.register(ctx)
}

func (c *Cloud) startPlacement(ctx context.Context) error {
	dir := filepath.Join(c.Dir, "placement")
	if _, err := c.run(ctx, "placement-manage", nil, "placement-manage", "--config-file", filepath.Join(dir, "placement.conf"), "db", "sync"); err != nil {
		return err
	}
	if err := c.uwsgi("placement", "/usr/bin/placement-api", c.Placement, []string{"OS_PLACEMENT_CONFIG_DIR=" + dir}); err != nil {
		return err
	}
	return c.wait(ctx, "placement", time.Minute, func() bool { return answers(fmt.Sprintf("http://127.0.0.1:%d/", c.Placement)) })
}

func (c *Cloud) startGlance(ctx context.Context) error {
	conf := filepath.Join(c.Dir, "glance", "glance-api.conf")
	if _, err := c.run(ctx, "glance-manage", nil, c.script("glance-manage"), "--config-file", conf, "db_sync"); err != nil {
		return err
	}
	if err := c.start("glance-api", nil, c.script("glance-api"), "--config-file", conf); err != nil {
		return err
	}
	return c.wait(ctx, "glance-api", time.Minute, func() bool { return answers(fmt.Sprintf("http://127.0.0.1:%d/", c.Glance)) })
}

// novaManage runs nova-manage with nova.conf.
func (c *Cloud) novaManage(ctx context.Context, args ...string) (string, error) {
	return c.run(ctx, "nova-manage", nil, append([]string{c.script("nova-manage"), "--config-file", filepath.Join(c.Dir, "nova", "nova.conf")}, args...)...)
}

// syncNova makes Nova's three databases and its two cells.
func (c *Cloud) syncNova(ctx context.Context) error {
	for _, args := range [][]string{
		{"api_db", "sync"},
		{"cell_v2", "map_cell0"},
		{"cell_v2", "create_cell", "--name", "cell1"},
		{"db", "sync"},
	} {
		if _, err := c.novaManage(ctx, args...); err != nil {
			return err
		}
	}
	return nil
}

// startNova starts Nova's services and maps the compute host once it
// registered.
func (c *Cloud) startNova(ctx context.Context) error {
	conf := filepath.Join(c.Dir, "nova", "nova.conf")
	services := []string{"nova-conductor", "nova-scheduler", "nova-api", "nova-compute"}
	if c.opts.NoFakeCompute {
		services = services[:3]
	}
	for _, s := range services {
		if err := c.start(s, nil, c.script(s), "--config-file", conf); err != nil {
			return err
		}
	}
	if err := c.wait(ctx, "nova-api", 2*time.Minute, func() bool { return answers(fmt.Sprintf("http://127.0.0.1:%d/v2.1", c.Nova)) }); err != nil {
		return err
	}
	if c.opts.NoFakeCompute {
		return nil
	}
	return c.waitMapped(ctx, "nova-compute", Host)
}

// script is the path of DIR/bin/NAME, a Python entry point of a service
// Debian ships only inside its service package (written by writeConfig).
func (c *Cloud) script(name string) string { return filepath.Join(c.Dir, "bin", name) }

// entryPoints are the scripts in DIR/bin: the service packages (nova-api,
// glance-api, ...) that ship them also ship system services.
var entryPoints = map[string]string{
	"nova-manage":               "nova.cmd.manage",
	"nova-api":                  "nova.cmd.api",
	"nova-conductor":            "nova.cmd.conductor",
	"nova-scheduler":            "nova.cmd.scheduler",
	"nova-compute":              "nova.cmd.compute",
	"glance-manage":             "glance.cmd.manage",
	"glance-api":                "glance.cmd.api",
	"neutron-db-manage":         "neutron.db.migration.cli",
	"neutron-server":            "neutron.cmd.eventlet.server",
	"neutron-linuxbridge-agent": "neutron.cmd.eventlet.plugins.linuxbridge_neutron_agent",
}

func (c *Cloud) writeConfig() error {
	for name, module := range entryPoints {
		text := fmt.Sprintf("#!/usr/bin/python3\n# %s, as AX's test/openstack runs it\nimport sys\nfrom %s import main\nsys.exit(main())\n", name, module)
		if err := os.WriteFile(c.script(name), []byte(text), 0o700); err != nil {
			return err
		}
	}
	for _, set := range []map[string]string{configs, neutronConfigs} {
		for path, tmpl := range set {
			if err := os.WriteFile(filepath.Join(c.Dir, path), []byte(render(tmpl, c)), 0o600); err != nil {
				return err
			}
		}
	}
	return nil
}

func render(tmpl string, c *Cloud) string {
	return renderWith(tmpl, struct {
		*Cloud
		Password, Host string
	}{c, Password, Host})
}

// renderWith executes template tmpl with data.
func renderWith(tmpl string, data any) string {
	var b bytes.Buffer
	template.Must(template.New("").Parse(tmpl)).Execute(&b, data)
	return b.String()
}

// freePorts are n TCP ports free on 127.0.0.1 now.
func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func dial(port int) bool {
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
	if err != nil {
		return false
	}
	conn.Close()
	return true
}

// answers says whether url answers HTTP below 500.
func answers(url string) bool {
	cl := http.Client{Timeout: 5 * time.Second}
	resp, err := cl.Get(url)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode < 500
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}
