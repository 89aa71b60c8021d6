package guestrun

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func fakeBins(names ...string) []binary {
	var bins []binary
	for _, n := range names {
		bins = append(bins, binary{Package: Package{Path: "example.com/m/" + n}, Name: n})
	}
	return bins
}

// feed runs console lines through a console whose clock steps 1 s per line.
func feed(bins []binary, lines ...string) (*console, *Result, string) {
	clock := time.Unix(0, 0)
	now := func() time.Time { return clock }
	var out strings.Builder
	res := &Result{}
	c := newConsole(&out, now, bins, res)
	for _, l := range lines {
		clock = clock.Add(time.Second)
		c.line(l)
	}
	c.ended()
	return c, res, out.String()
}

func TestConsoleFollowsMarkers(t *testing.T) {
	bins := fakeBins("a", "b")
	c, res, out := feed(bins,
		"[    0.512345] random: crng init done\r",
		"AXRUN-WARN insmod sch_plug.ko failed",
		"AXRUN-KERNEL 6.1.0-56-cloud-amd64",
		"AXRUN-BEGIN a",
		"=== RUN   TestX",
		"--- FAIL: TestX (0.00s)",
		"    --- FAIL: TestX/sub (0.00s)",
		"FAIL",
		"AXRUN-END a 1",
		"AXRUN-BEGIN b",
		"no newline at the endAXRUN-END b 0",
		"AXRUN-DONE",
	)
	if !c.done {
		t.Fatal("AXRUN-DONE not seen")
	}
	want := []TestRun{
		{Package: "example.com/m/a", Name: "a", ExitCode: 1, Duration: 5 * time.Second, Failed: []string{"TestX"}},
		{Package: "example.com/m/b", Name: "b", ExitCode: 0, Duration: time.Second},
	}
	if !reflect.DeepEqual(res.Tests, want) {
		t.Errorf("tests = %+v\nwant %+v", res.Tests, want)
	}
	if res.Kernel != "6.1.0-56-cloud-amd64" || res.Boot != 4*time.Second {
		t.Errorf("kernel %q boot %s", res.Kernel, res.Boot)
	}
	if len(res.Warnings) != 1 || res.Warnings[0] != "insmod sch_plug.ko failed" {
		t.Errorf("warnings = %q", res.Warnings)
	}
	if strings.Contains(out, "\r") || !strings.HasPrefix(out, "[    0.512345] random: crng init done\n") {
		t.Errorf("output not forwarded line by line: %q", out)
	}
	if res.Passed() {
		t.Error("a run with a failed binary passed")
	}
	if err := verdict(context.Background(), Config{}, c, bins, nil, ""); err != nil {
		t.Errorf("complete run: verdict %v", err)
	}
}

func TestConsoleIgnoresMarkersOutOfPlace(t *testing.T) {
	bins := fakeBins("a", "b")
	_, res, _ := feed(bins,
		"AXRUN-BEGIN a",
		"AXRUN-BEGIN b",    // a test printing a marker while a runs
		"AXRUN-END b 0",    // not the running binary
		"AXRUN-END a zero", // not an exit code
		"AXRUN-DONE",       // a still runs
		"AXRUN-END a 2",
		"AXRUN-BEGIN nosuch",
		"AXRUN-BEGIN a", // a ran already
	)
	if len(res.Tests) != 1 || res.Tests[0].ExitCode != 2 {
		t.Fatalf("tests = %+v", res.Tests)
	}
}

func TestVerdict(t *testing.T) {
	bins := fakeBins("a", "b")
	timedOut, cancel := context.WithTimeoutCause(context.Background(), 0, ErrTimeout)
	defer cancel()
	cancelled, cancel2 := context.WithCancel(context.Background())
	cancel2()
	bg := context.Background()
	for _, tc := range []struct {
		name  string
		ctx   context.Context
		lines []string
		is    error
		says  []string
	}{
		{"panic while a runs", bg, []string{
			"AXRUN-BEGIN a",
			"[    2.398000] Kernel panic - not syncing: sysrq triggered crash",
			"[    2.399000] CPU: 0 PID: 80 Comm: a.test",
		}, ErrGuestPanic, []string{"example.com/m/a (a.test)", "sysrq triggered crash", "never started: example.com/m/b"}},
		{"panic before tests", bg, []string{
			"[    0.9] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
		}, ErrGuestPanic, []string{"while the guest booted", "Attempted to kill init"}},
		{"timeout while b runs", timedOut, []string{
			"AXRUN-BEGIN a", "AXRUN-END a 0", "AXRUN-BEGIN b", "=== RUN   TestHang",
		}, ErrTimeout, []string{"example.com/m/b (b.test)", "=== RUN   TestHang"}},
		{"cancelled", cancelled, []string{"AXRUN-BEGIN a"}, context.Canceled, []string{"example.com/m/a (a.test)"}},
		{"exit without done", bg, []string{
			"AXRUN-BEGIN a", "AXRUN-END a 0",
		}, ErrGuestExited, []string{"after the tests of example.com/m/a (a.test) ended", "never started: example.com/m/b", "qemu: oops"}},
		{"done but one missing", bg, []string{
			"AXRUN-BEGIN a", "AXRUN-END a 0", "AXRUN-DONE",
		}, ErrGuestExited, []string{"never started: example.com/m/b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _, _ := feed(bins, tc.lines...)
			err := verdict(tc.ctx, Config{Timeout: time.Minute}, c, bins, errors.New("exit status 1"), "qemu: oops\n")
			if !errors.Is(err, tc.is) {
				t.Fatalf("err = %v, want %v", err, tc.is)
			}
			for _, s := range tc.says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
		})
	}
}

func TestKernelFaults(t *testing.T) {
	_, res, _ := feed(fakeBins("a"),
		"AXRUN-BEGIN a",
		"[   12.000001] BUG: kernel NULL pointer dereference, address: 0000000000000000",
		"[   12.000002] Oops: 0002 [#1] PREEMPT SMP NOPTI",
		"t.Log: BUG: not a kernel line",
		"AXRUN-END a 0",
		"AXRUN-DONE",
	)
	if len(res.KernelFaults) != 2 {
		t.Fatalf("faults = %q", res.KernelFaults)
	}
	if res.Passed() {
		t.Error("a run with kernel faults passed")
	}
}

func TestBinaryNames(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{[]string{"github.com/axproject/ax/ax/dirty"}, []string{"dirty"}},
		{[]string{"x/ax/dirty", "x/lab/dirty", "x/netbuffer"}, []string{"ax-dirty", "lab-dirty", "netbuffer"}},
		{[]string{"a/b", "b"}, []string{"a-b", "b"}},
		{[]string{"example.com/we~ird"}, []string{"we_ird"}},
	} {
		if got := binaryNames(tc.in); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("binaryNames(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestParsePackage(t *testing.T) {
	p, err := ParsePackage("github.com/axproject/ax/ax/dirty:TestSoftDirty|TestHash:x")
	if err != nil || p.Path != "github.com/axproject/ax/ax/dirty" || p.Run != "TestSoftDirty|TestHash:x" {
		t.Errorf("got %+v, %v", p, err)
	}
	if _, err := ParsePackage(":TestX"); err == nil {
		t.Error("empty import path accepted")
	}
}

func TestConfigDefaults(t *testing.T) {
	if _, err := withDefaults(Config{}); err == nil {
		t.Error("no packages accepted")
	}
	pkgs := []Package{{Path: "x"}}
	cfg, err := withDefaults(Config{Packages: pkgs, Accel: "tcg"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Timeout != DefaultTimeout || cfg.TestTimeout != DefaultTimeout*9/10 || cfg.RAMMiB != DefaultRAMMiB ||
		!reflect.DeepEqual(cfg.Modules, DefaultModules) || !reflect.DeepEqual(cfg.Env, DefaultEnv) {
		t.Errorf("defaults: %+v", cfg)
	}
	if cfg, _ := withDefaults(Config{Packages: pkgs, Accel: "tcg", Modules: []string{}}); len(cfg.Modules) != 0 {
		t.Error("an empty module list was replaced by the defaults")
	}
	for _, bad := range []Config{
		{Packages: pkgs, Env: []string{"NOEQUALS"}},
		{Packages: pkgs, Env: []string{"1X=y"}},
		{Packages: pkgs, Env: []string{"A B=y"}},
		{Packages: pkgs, Accel: "hvf"},
	} {
		if _, err := withDefaults(bad); err == nil {
			t.Errorf("accepted %+v", bad)
		}
	}
}

// TestRunPlanQuoting runs the generated plan through the host's sh with a
// stand-in axrun, so every argument must arrive as one unchanged word.
func TestRunPlanQuoting(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	cfg := Config{
		Env:         []string{"AX_X=it's $HOME `id` \"q\"", "AX_EMPTY="},
		TestTimeout: 9 * time.Minute,
		TestArgs:    []string{"-test.short"},
	}
	bins := []binary{
		{Name: "a", Package: Package{Run: `TestA|TestB$ (x) 'y'`}},
		{Name: "b"},
	}
	plan := filepath.Join(t.TempDir(), "plan")
	script := `axrun() { for a in "$@"; do printf '[%s]' "$a"; done; echo; }` + "\n" + runPlan(cfg, bins) +
		`printf '%s|%s|%s\n' "$AX_X" "$AX_EMPTY" "$AX_GUESTRUN"` + "\n"
	if err := os.WriteFile(plan, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sh, plan).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	want := "[a][-test.timeout=9m0s][-test.run=TestA|TestB$ (x) 'y'][-test.short]\n" +
		"[b][-test.timeout=9m0s][-test.short]\n" +
		"it's $HOME `id` \"q\"||1\n"
	if string(out) != want {
		t.Errorf("plan ran as:\n%s\nwant:\n%s", out, want)
	}
}

func TestTarTestdata(t *testing.T) {
	dir := t.TempDir()
	if data, err := tarTestdata(filepath.Join(dir, "testdata")); err != nil || data != nil {
		t.Fatalf("no testdata: %d bytes, %v", len(data), err)
	}
	td := filepath.Join(dir, "testdata")
	os.MkdirAll(filepath.Join(td, "fuzz", "FuzzX"), 0o755)
	os.WriteFile(filepath.Join(td, "fuzz", "FuzzX", "seed"), []byte("go test fuzz v1\n"), 0o644)
	first, err := tarTestdata(td)
	if err != nil {
		t.Fatal(err)
	}
	// Touching a file changes no byte: images are cached by content.
	later := time.Now().Add(time.Hour)
	os.Chtimes(filepath.Join(td, "fuzz", "FuzzX", "seed"), later, later)
	again, _ := tarTestdata(td)
	if string(first) != string(again) {
		t.Error("tar depends on modification times")
	}
	if !strings.Contains(string(first), "testdata/fuzz/FuzzX/seed") {
		t.Error("tar lacks testdata/fuzz/FuzzX/seed")
	}
}
