package main

import (
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// pushFixtureImage pushes a busybox image with an app layer and cfg as
// its container config to repo:tag (plain gzip layers).
func pushFixtureImage(t *testing.T, reg *remotetest.Registry, repo, tag string, cfg ocispec.ImageConfig) {
	t.Helper()
	base, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	app := fixture.NewLayer().
		File("app/a.txt", "alpha\n").
		File("app/b.txt", "bravo\n").
		File("app/unread.txt", "not read at start-up\n").
		File("app/zz-last.txt", "last\n")
	img, err := fixture.BuildImage(cfg, base, app)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range img.Layers {
		reg.PushBlob(t, repo, l.Data)
	}
	reg.PushBlob(t, repo, img.ConfigBytes)
	reg.PushManifest(t, repo, tag, img.ManifestBytes)
}

// prioritizedOf returns, for each layer of repo:tag, the names before the
// prefetch landmark (nil when the layer has none).
func prioritizedOf(t *testing.T, reg *remotetest.Registry, repo, tag string) [][]string {
	t.Helper()
	m := parseManifest(t, getManifest(t, reg, repo, tag))
	names := checkLayers(t, m, func(d digest.Digest) []byte { return reg.Blob(t, repo, d) }, ocispec.MediaTypeImageLayerGzip)
	var out [][]string
	for _, ns := range names {
		i := slices.Index(ns, estargz.PrefetchLandmark)
		if i < 0 {
			out = append(out, nil)
			continue
		}
		out = append(out, ns[:i])
	}
	return out
}

// TestOptimizeCommand records a start-up that reads two files of an
// eStargz image, with the image's environment, working directory and user,
// and checks that the optimized image has them first (in the order read),
// the rest after the landmark, and runs the same way.
func TestOptimizeCommand(t *testing.T) {
	if why := canMount(); why != "" {
		t.Skip(why)
	}
	reg := remotetest.NewRegistry(t)
	pushFixtureImage(t, reg, "app", "v1", ocispec.ImageConfig{
		Env: []string{"PATH=/bin", "GREETING=hello"}, WorkingDir: "/app", User: "1000:1000", Cmd: []string{"/bin/sh"},
	})
	if _, _, err := run(t, append(hermetic(t), "convert", reg.Ref("app", "v1"), reg.Ref("app", "esgz"))...); err != nil {
		t.Fatal(err)
	}
	env := []string{"TMPDIR=" + t.TempDir()}
	record := filepath.Join(t.TempDir(), "record.txt")
	script := `cat b.txt a.txt; echo "$GREETING $(pwd) $(id -u):$(id -g) $HOME"; test -d /proc/self && test -c /dev/null && echo specials; echo x > /tmp/written && echo wrote`
	args := append(hermetic(t), "optimize", "--record", record, reg.Ref("app", "esgz"), reg.Ref("app", "opt"), "--", "sh", "-c", script)
	out, errOut, code := runProcess(t, env, args...)
	if code != 0 {
		t.Fatalf("optimize: exit %d\n%s", code, errOut)
	}
	for _, want := range []string{"bravo\nalpha\n", "hello /app 1000:1000 /\n", "specials\n", "wrote\n", "running sh -c", "recorded ", "converting "} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errOut)
		}
	}
	if !strings.HasPrefix(out, reg.Ref("app", "opt")+" sha256:") || !strings.Contains(out, "files prioritized") {
		t.Errorf("stdout %q", out)
	}
	rec, err := os.ReadFile(record)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(rec)), "\n")
	if ib, ia := slices.Index(lines, "app/b.txt"), slices.Index(lines, "app/a.txt"); ib < 0 || ia < ib {
		t.Errorf("record %q: want app/b.txt, then app/a.txt", lines)
	}
	if slices.Contains(lines, "app/unread.txt") {
		t.Errorf("record %q lists a file the workload did not read", lines)
	}

	prio := prioritizedOf(t, reg, "app", "opt")
	if len(prio) != 2 {
		t.Fatalf("%d layers, want 2", len(prio))
	}
	appPrio := prio[1]
	ib, ia := slices.Index(appPrio, "app/b.txt"), slices.Index(appPrio, "app/a.txt")
	if ib < 0 || ia < ib {
		t.Errorf("app layer's prioritized region %q: want app/b.txt, then app/a.txt", appPrio)
	}
	for _, n := range []string{"app/unread.txt", "app/zz-last.txt"} {
		if slices.Contains(appPrio, n) {
			t.Errorf("%s (not read) is in the prioritized region %q", n, appPrio)
		}
	}

	// The optimized image runs the same, and optimizing it again gives
	// the same prioritized regions.
	args = append(hermetic(t), "optimize", reg.Ref("app", "opt"), reg.Ref("app", "opt2"), "--", "sh", "-c", script)
	_, errOut2, code := runProcess(t, env, args...)
	if code != 0 {
		t.Fatalf("optimize of the optimized image: exit %d\n%s", code, errOut2)
	}
	if !strings.Contains(errOut2, "bravo\nalpha\nhello /app 1000:1000 /\nspecials\nwrote\n") {
		t.Errorf("the optimized image runs differently:\n%s", errOut2)
	}
	if got := prioritizedOf(t, reg, "app", "opt2"); !slices.Equal(got[1], appPrio) {
		t.Errorf("optimizing again: prioritized %q, first time %q", got[1], appPrio)
	}
}

// TestOptimizeReady stops the recording of a workload that does not exit
// at its ready line.
func TestOptimizeReady(t *testing.T) {
	if why := canMount(); why != "" {
		t.Skip(why)
	}
	reg := remotetest.NewRegistry(t)
	pushFixtureImage(t, reg, "app", "v1", fixture.DefaultConfig())
	if _, _, err := run(t, append(hermetic(t), "convert", reg.Ref("app", "v1"), reg.Ref("app", "esgz"))...); err != nil {
		t.Fatal(err)
	}
	args := append(hermetic(t), "optimize", "--ready", "^READY$", "--timeout", "50s", reg.Ref("app", "esgz"), reg.Ref("app", "opt"),
		"--", "/bin/sh", "-c", "cat /app/a.txt; echo home=$HOME; echo READY; exec sleep 600")
	_, errOut, code := runProcess(t, []string{"TMPDIR=" + t.TempDir()}, args...)
	if code != 0 {
		t.Fatalf("optimize: exit %d\n%s", code, errOut)
	}
	if !strings.Contains(errOut, "matches --ready") || !strings.Contains(errOut, "home=/root\n") {
		t.Errorf("stderr does not report the ready line, or HOME is not root's:\n%s", errOut)
	}
	prio := prioritizedOf(t, reg, "app", "opt")
	if !slices.Contains(prio[1], "app/a.txt") || slices.Contains(prio[1], "app/b.txt") {
		t.Errorf("prioritized region %q: want app/a.txt, not app/b.txt", prio[1])
	}
}

// TestOptimizePlainSource optimizes an image that is not eStargz: it is
// converted to DST for the recording, then converted again with the record.
func TestOptimizePlainSource(t *testing.T) {
	if why := canMount(); why != "" {
		t.Skip(why)
	}
	reg := remotetest.NewRegistry(t)
	pushFixtureImage(t, reg, "app", "v1", fixture.DefaultConfig())
	args := append(hermetic(t), "optimize", "--zstd", reg.Ref("app", "v1"), reg.Ref("app", "opt"), "--", "cat", "/app/b.txt")
	_, errOut, code := runProcess(t, []string{"TMPDIR=" + t.TempDir()}, args...)
	if code != 0 {
		t.Fatalf("optimize: exit %d\n%s", code, errOut)
	}
	if !strings.Contains(errOut, "is not eStargz: converting it to") || !strings.Contains(errOut, "bravo\n") {
		t.Errorf("stderr:\n%s", errOut)
	}
	m := parseManifest(t, getManifest(t, reg, "app", "opt"))
	names := checkLayers(t, m, func(d digest.Digest) []byte { return reg.Blob(t, "app", d) }, ocispec.MediaTypeImageLayerZstd)
	lm := slices.Index(names[1], estargz.PrefetchLandmark)
	if i := slices.Index(names[1], "app/b.txt"); lm < 0 || i < 0 || i > lm || slices.Index(names[1], "app/a.txt") < lm {
		t.Errorf("app layer order %q: want app/b.txt alone before the landmark", names[1])
	}
}

// TestOptimizeErrors: a bad reference, a command the image lacks, a
// workload that fails and a timeout fail with a message that says so.
func TestOptimizeErrors(t *testing.T) {
	if why := canMount(); why != "" {
		t.Skip(why)
	}
	reg := remotetest.NewRegistry(t)
	pushFixtureImage(t, reg, "app", "v1", fixture.DefaultConfig())
	esgz := reg.Ref("app", "esgz")
	if _, _, err := run(t, append(hermetic(t), "convert", reg.Ref("app", "v1"), esgz)...); err != nil {
		t.Fatal(err)
	}
	dst := reg.Ref("app", "opt")
	for _, c := range []struct {
		name string
		args []string
		want []string
	}{
		{"bad ref", []string{reg.Ref("app", "nope"), dst, "--", "/bin/true"}, []string{"resolving " + reg.Ref("app", "nope")}},
		{"no such command", []string{esgz, dst, "--", "/usr/bin/python3", "-V"}, []string{"command /usr/bin/python3 not found in the image"}},
		{"not in PATH", []string{esgz, dst, "--", "python3"}, []string{"command python3 not found in the image (PATH=/bin)"}},
		{"fails", []string{esgz, dst, "--", "/bin/sh", "-c", "exit 3"}, []string{"/bin/sh exited with exit status 3"}},
		{"timeout", []string{"--timeout", "2s", esgz, dst, "--", "/bin/sleep", "600"}, []string{"timeout: /bin/sleep did not exit within 2s"}},
		{"timeout ready", []string{"--timeout", "2s", "--ready", "never", esgz, dst, "--", "/bin/sleep", "600"}, []string{`printed no line matching --ready "never"`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, errOut, code := runProcess(t, []string{"TMPDIR=" + t.TempDir()}, append(append(hermetic(t), "optimize"), c.args...)...)
			if code != 1 {
				t.Errorf("exit %d, want 1\n%s", code, errOut)
			}
			for _, w := range c.want {
				if !strings.Contains(errOut, w) {
					t.Errorf("stderr lacks %q:\n%s", w, errOut)
				}
			}
		})
	}
	if b := getManifestStatus(t, reg, "app", "opt"); b {
		t.Errorf("a failed optimize pushed %s", dst)
	}
	// Usage errors exit 2.
	for _, args := range [][]string{
		{"optimize", reg.Ref("app", "v1"), "oci-layout:" + t.TempDir() + ":x", "--", "/bin/true"},
		{"optimize", esgz, dst},
		{"optimize", "--ready", "(", esgz, dst, "--", "/bin/true"},
		{"optimize", "--timeout", "0s", esgz, dst, "--", "/bin/true"},
	} {
		if _, errOut, code := runProcess(t, nil, append(hermetic(t), args...)...); code != 2 {
			t.Errorf("%q: exit %d, want 2\n%s", args, code, errOut)
		}
	}
}

// getManifestStatus reports whether repo:ref exists.
func getManifestStatus(t *testing.T, reg *remotetest.Registry, repo, ref string) bool {
	t.Helper()
	req, _ := http.NewRequest(http.MethodHead, reg.URL()+"/v2/"+repo+"/manifests/"+ref, nil)
	req.Header.Set("Accept", ocispec.MediaTypeImageManifest)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}
