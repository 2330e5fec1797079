package main

// The CLI runs in-process (newRootCommand with SetArgs/SetOut/SetErr) for
// most tests; tests that need the real process (exit status, stderr of the
// process, mount in the background, signals) run this test binary as
// lazypull: TestMain calls main() when LAZYPULL_TEST_MAIN is set.

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote/remotetest"
)

func TestMain(m *testing.M) {
	if os.Getenv("LAZYPULL_TEST_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	// No docker credentials from the host unless a test sets its own.
	cfg, err := os.MkdirTemp("", "lazypull-docker-config-")
	if err != nil {
		panic(err)
	}
	os.Setenv("DOCKER_CONFIG", cfg)
	code := m.Run()
	cleanupBench()
	os.RemoveAll(cfg)
	os.Exit(code)
}

// hermetic points registry configuration at empty places, so that the
// host's hosts.toml and docker credentials do not matter.
func hermetic(t *testing.T) []string {
	t.Helper()
	return []string{"--hosts-dir", t.TempDir()}
}

// run runs lazypull in-process with args and returns its stdout, stderr
// and error.
func run(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := newRootCommand()
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := cmd.ExecuteContext(ctx)
	return out.String(), errb.String(), err
}

// runProcess runs this test binary as lazypull and returns stdout, stderr
// and the exit status.
func runProcess(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := lazypullCmd(ctx, env, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.String(), errb.String(), 0
	case errors.As(err, &ee):
		return out.String(), errb.String(), ee.ExitCode()
	}
	t.Fatalf("running lazypull %v: %v", args, err)
	return "", "", -1
}

func lazypullCmd(ctx context.Context, env []string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, os.Args[0], args...)
	cmd.Env = append(os.Environ(), "LAZYPULL_TEST_MAIN=1")
	cmd.Env = append(cmd.Env, env...)
	return cmd
}

// file is a regular file of a test layer.
type file struct {
	name, data string
}

// tarGz makes a gzip layer of files (parent directories included) and
// returns it with its diff_id.
func tarGz(t *testing.T, files ...file) remotetest.Layer {
	t.Helper()
	l := fixture.NewLayer()
	for _, f := range files {
		l.File(f.name, f.data, fixture.ModTime(time.Date(2024, 5, 17, 0, 0, 0, 0, time.UTC)))
	}
	b, err := fixture.GzipLayer(l)
	if err != nil {
		t.Fatal(err)
	}
	return remotetest.Layer{Data: b.Data, DiffID: b.DiffID}
}

// testLayers are a base layer and an upper one that replaces a file.
func testLayers(t *testing.T) []remotetest.Layer {
	big := strings.Repeat("lazypull ", 100000) // 900 KB, several chunks
	return []remotetest.Layer{
		tarGz(t, file{"etc/os-release", "ID=base\n"}, file{"usr/bin/tool", big}, file{"usr/share/doc/readme", "read me\n"}),
		tarGz(t, file{"etc/os-release", "ID=upper\n"}, file{"usr/bin/app", "#!/bin/sh\necho app\n"}),
	}
}

func wantUsage(t *testing.T, err error, mention ...string) {
	t.Helper()
	var ue usageError
	if !errors.As(err, &ue) {
		t.Errorf("error %v (%T) is not a usage error", err, err)
		return
	}
	for _, m := range mention {
		if !strings.Contains(err.Error(), m) {
			t.Errorf("error %q does not mention %q", err, m)
		}
	}
}

func TestHelp(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"--help"}, []string{"convert", "mount", "pull", "bench", "optimize", "profile", "--log-level"}},
		{[]string{"convert", "--help"}, []string{"convert [flags] SRC DST", "oci-layout:DIR[:TAG]", "--zstd", "--chunk-size", "--level", "--prioritize", "--platform", "--plain-http"}},
		{[]string{"mount", "--help"}, []string{"mount [flags] REF DIR", "--blob", "--cache-dir", "--platform"}},
		{[]string{"pull", "--help"}, []string{"pull [flags] REF", "--address", "--snapshotter"}},
		{[]string{"help", "convert"}, []string{"convert [flags] SRC DST"}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, errOut, err := run(t, tc.args...)
			if err != nil {
				t.Fatalf("%v: %v", tc.args, err)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("help does not mention %q:\n%s", w, out)
				}
			}
			if errOut != "" {
				t.Errorf("stderr: %q", errOut)
			}
		})
	}
	out, _, code := runProcess(t, nil, "convert", "--help")
	if code != 0 || !strings.Contains(out, "--prioritize") {
		t.Errorf("lazypull convert --help: exit %d, output %q", code, out)
	}
	out, _, code = runProcess(t, nil, "--version")
	if code != 0 || !strings.Contains(out, version) {
		t.Errorf("lazypull --version: exit %d, output %q", code, out)
	}
}

func TestUsageErrors(t *testing.T) {
	dir := t.TempDir()
	notDir := filepath.Join(dir, "file")
	os.WriteFile(notDir, nil, 0o644)
	src, dst := "127.0.0.1:1/a:v1", "127.0.0.1:1/a:v2"
	for _, tc := range []struct {
		name    string
		args    []string
		mention []string
	}{
		{"unknown flag", []string{"convert", "--bogus", src, dst}, []string{"--bogus", "lazypull convert --help"}},
		{"unknown root flag", []string{"--bogus"}, []string{"--bogus"}},
		{"no arguments", []string{"convert"}, []string{"SRC and DST", "0"}},
		{"one argument", []string{"convert", src}, []string{"SRC and DST", "1"}},
		{"three arguments", []string{"convert", src, dst, dst}, []string{"SRC and DST", "3"}},
		{"chunk size 0", []string{"convert", "--chunk-size", "0", src, dst}, []string{"--chunk-size"}},
		{"chunk size huge", []string{"convert", "--chunk-size", "1073741824", src, dst}, []string{"--chunk-size"}},
		{"chunk size not a number", []string{"convert", "--chunk-size", "big", src, dst}, []string{"chunk-size"}},
		{"gzip level 42", []string{"convert", "--level", "42", src, dst}, []string{"--level", "42"}},
		{"gzip level -1", []string{"convert", "--level", "-1", src, dst}, []string{"--level"}},
		{"zstd level 42", []string{"convert", "--zstd", "--level", "42", src, dst}, []string{"--level", "42"}},
		{"platform garbage", []string{"convert", "--platform", "garbage", src, dst}, []string{"--platform", "garbage"}},
		{"platform empty element", []string{"convert", "--platform", "linux/amd64,", src, dst}, []string{"--platform"}},
		{"log level", []string{"--log-level", "loud", "convert", src, dst}, []string{"--log-level", "loud"}},
		{"empty layout", []string{"convert", "oci-layout:", dst}, []string{"oci-layout:"}},
		{"mount no arguments", []string{"mount"}, []string{"REF and DIR", "0"}},
		{"mount one argument", []string{"mount", "127.0.0.1:1/a:v1"}, []string{"REF and DIR", "1"}},
		{"mount blob two arguments", []string{"mount", "--blob", "layer.tar.gz", "127.0.0.1:1/a:v1", dir}, []string{"--blob", "DIR", "2"}},
		{"mount blob no arguments", []string{"mount", "--blob", "layer.tar.gz"}, []string{"--blob", "DIR", "0"}},
		{"mount not a directory", []string{"mount", "--cache-dir", dir, "127.0.0.1:1/a:v1", notDir}, []string{notDir, "not a directory"}},
		{"mount two platforms", []string{"mount", "--cache-dir", dir, "--platform", "linux/amd64,linux/arm64", "127.0.0.1:1/a:v1", dir}, []string{"--platform"}},
		{"mount platform garbage", []string{"mount", "--cache-dir", dir, "--platform", "garbage", "127.0.0.1:1/a:v1", dir}, []string{"--platform", "garbage"}},
		{"pull no arguments", []string{"pull"}, []string{"REF", "0"}},
		{"pull platform garbage", []string{"pull", "--platform", "garbage", "127.0.0.1:1/a:v1"}, []string{"--platform", "garbage"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, _, err := run(t, append(hermetic(t), tc.args...)...)
			if tc.name == "unknown root flag" || tc.name == "log level" {
				out, _, err = run(t, tc.args...)
			}
			t.Logf("error: %v", err)
			wantUsage(t, err, tc.mention...)
			if out != "" {
				t.Errorf("stdout: %q", out)
			}
		})
	}
}

// TestExitStatus runs the process: usage errors exit 2 with the message on
// stderr, other failures 1.
func TestExitStatus(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	for _, tc := range []struct {
		args    []string
		code    int
		mention string
	}{
		{[]string{"convert", "--bogus", "a", "b"}, 2, "--bogus"},
		{[]string{"convert", "--chunk-size", "0", "a", "b"}, 2, "--chunk-size"},
		{[]string{"convert", "--level", "42", "a", "b"}, 2, "--level"},
		{[]string{"convert", "--platform", "garbage", "a", "b"}, 2, "--platform"},
		{[]string{"convert", "a"}, 2, "SRC and DST"},
		{[]string{"mount", "--blob", "x"}, 2, "--blob"},
		{[]string{"convert", "--hosts-dir", t.TempDir(), reg.Ref("missing", "v1"), reg.Ref("missing", "v2")}, 1, "missing"},
	} {
		out, errOut, code := runProcess(t, nil, tc.args...)
		if code != tc.code || !strings.HasPrefix(errOut, "lazypull: ") || !strings.Contains(errOut, tc.mention) || out != "" {
			t.Errorf("lazypull %v: exit %d, stdout %q, stderr %q; want exit %d and a message naming %s", tc.args, code, out, errOut, tc.code, tc.mention)
		}
	}
}
