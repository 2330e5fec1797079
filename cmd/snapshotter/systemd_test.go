package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lazypull/lazypull/internal/lab"
	"github.com/lazypull/lazypull/service"
)

// unitFile parses a systemd unit: section → key → values, in order.
func unitFile(t *testing.T, path string) map[string]map[string][]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]map[string][]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if out[section] == nil {
				out[section] = map[string][]string{}
			}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s: unparsable line %q", path, line)
			}
			out[section][strings.TrimSpace(k)] = append(out[section][strings.TrimSpace(k)], strings.TrimSpace(v))
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestSystemdUnitKeepsFuseManager: the fuse manager (the default) is a
// child of the daemon in the unit's cgroup, so the unit must signal only
// the daemon on stop (KillMode=process): with control-group or mixed,
// `systemctl restart` would kill the manager and every running
// container's FUSE server with it. Nothing the unit runs on stop may stop
// the manager either.
func TestSystemdUnitKeepsFuseManager(t *testing.T) {
	if !service.DefaultConfig().FuseManager.Enable {
		t.Fatal("the fuse manager is not the default; this test is about the unit keeping it")
	}
	root, err := lab.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(root, "contrib", "systemd", "lazypull-snapshotter.service")
	u := unitFile(t, path)
	svc := u["Service"]
	if svc == nil {
		t.Fatalf("%s: no [Service] section", path)
	}
	if km := svc["KillMode"]; len(km) != 1 || km[0] != "process" {
		t.Errorf("KillMode = %q, want exactly [process]: any other mode kills the fuse manager on systemctl restart", km)
	}
	if ks := svc["KillSignal"]; len(ks) > 0 && ks[len(ks)-1] != "SIGTERM" {
		t.Errorf("KillSignal = %q: the daemon stops gracefully on SIGTERM", ks)
	}
	for _, key := range []string{"ExecStop", "ExecStopPost", "ExecReload"} {
		for _, cmd := range svc[key] {
			if strings.Contains(cmd, "fuse-manager") || strings.Contains(cmd, "kill") {
				t.Errorf("%s=%s would stop the fuse manager at every restart", key, cmd)
			}
		}
	}
	start := svc["ExecStart"]
	if len(start) != 1 || !strings.Contains(start[0], "lazypull-snapshotter ") || strings.Contains(start[0], "fuse-manager") {
		t.Errorf("ExecStart = %q, want the daemon (which starts the manager)", start)
	}
	if r := svc["Restart"]; len(r) != 1 || r[0] != "always" {
		t.Errorf("Restart = %q, want always: a killed daemon comes back and reconnects to the manager", r)
	}

	// The drop-ins shipped for the unit must not override it.
	dropins, err := filepath.Glob(filepath.Join(root, "contrib", "*", "lazypull-snapshotter.service.d-*.conf"))
	if err != nil || len(dropins) == 0 {
		t.Fatalf("no drop-ins found (%v): the glob is stale", err)
	}
	for _, p := range dropins {
		if km := unitFile(t, p)["Service"]["KillMode"]; len(km) > 0 && km[len(km)-1] != "process" {
			t.Errorf("%s sets KillMode=%s", p, km[len(km)-1])
		}
	}

	// systemd's own parser accepts the unit (offline; the binary path is
	// pointed at this test's binary, which exists).
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Logf("systemd-analyze not installed; the unit was checked by the parser above only")
		return
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	unit := strings.ReplaceAll(string(b), "/usr/local/bin/lazypull-snapshotter", exe)
	tmp := filepath.Join(t.TempDir(), "lazypull-snapshotter.service")
	if err := os.WriteFile(tmp, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(analyze, "verify", tmp).CombinedOutput(); err != nil {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}
