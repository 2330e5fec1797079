package main

import (
	"bufio"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/internal/lab"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// mountsUnder lists the mount points at or below dir.
func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	ms, err := lab.MountedUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

// canMount reports why FUSE and overlay mounts cannot be tested here, or
// "".
func canMount() string {
	if os.Geteuid() != 0 {
		return "needs root"
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return "no /dev/fuse"
	}
	if b, err := os.ReadFile("/proc/filesystems"); err != nil || !strings.Contains(string(b), "overlay") || !strings.Contains(string(b), "fuse") {
		return "no overlay or fuse file system"
	}
	return ""
}

// TestMountCommand converts an image into the registry, mounts it with
// the lazypull process in the background, reads it, and stops the process
// with SIGTERM.
func TestMountCommand(t *testing.T) {
	if why := canMount(); why != "" {
		t.Skip(why)
	}
	reg := remotetest.NewRegistry(t)
	reg.PushImage(t, "app", "v1", testLayers(t)...)
	ref := reg.Ref("app", "esgz")
	if _, _, err := run(t, append(hermetic(t), "convert", reg.Ref("app", "v1"), ref)...); err != nil {
		t.Fatal(err)
	}

	base := t.TempDir()
	mnt, tmp, cache := filepath.Join(base, "mnt"), filepath.Join(base, "tmp"), filepath.Join(base, "cache")
	for _, d := range []string{mnt, tmp} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := lazypullCmd(ctx, []string{"TMPDIR=" + tmp, "DOCKER_CONFIG=" + t.TempDir()},
		"mount", "--hosts-dir", t.TempDir(), "--cache-dir", cache, ref, mnt)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	// Whatever happens, leave nothing mounted behind (this runs before
	// the TempDir cleanups).
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			cmd.Process.Kill()
			<-exited
		}
		if err := mount.UnmountRecursive(base, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting what is left under %s: %v", base, err)
		}
	})

	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "lazypull: mounted ") {
				ready <- sc.Text()
			}
		}
	}()
	select {
	case line := <-ready:
		if !strings.Contains(line, ref) || !strings.Contains(line, "2 layers") || !strings.HasSuffix(line, " at "+mnt) {
			t.Errorf("ready line %q", line)
		}
	case <-exited:
		t.Fatalf("lazypull mount exited before it was ready: %v\n%s", waitErr, stderr.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("lazypull mount not ready after 30s\n%s", stderr.String())
	}

	// The image's setuid bits and device nodes do not work through it.
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	if st.Flags&unix.ST_NOSUID == 0 || st.Flags&unix.ST_NODEV == 0 || st.Flags&unix.ST_RDONLY == 0 {
		t.Errorf("mount flags %#x: want read-only, nosuid and nodev", st.Flags)
	}

	// The upper layer's file wins; both layers' files are there.
	for name, want := range map[string]string{
		"etc/os-release":       "ID=upper\n",
		"usr/bin/app":          "#!/bin/sh\necho app\n",
		"usr/share/doc/readme": "read me\n",
		"usr/bin/tool":         strings.Repeat("lazypull ", 100000),
	} {
		b, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil || string(b) != want {
			t.Errorf("%s: %d bytes (%v), want %d bytes", name, len(b), err, len(want))
		}
	}
	var names []string
	ents, err := os.ReadDir(filepath.Join(mnt, "usr/bin"))
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if err != nil || !slices.Equal(names, []string{"app", "tool"}) {
		t.Errorf("usr/bin lists %v (%v), want [app tool]", names, err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "new"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("writing to the mount: %v, want EROFS", err)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
		if waitErr != nil {
			t.Errorf("lazypull mount after SIGTERM: %v\n%s", waitErr, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("lazypull mount still running 20s after SIGTERM\n%s", stderr.String())
	}
	if ms := mountsUnder(t, base); len(ms) > 0 {
		t.Errorf("left mounted: %v", ms)
	}
	if mounted, _ := mountinfo.Mounted(mnt); mounted {
		t.Errorf("%s still mounted", mnt)
	}
	if ents, _ := os.ReadDir(tmp); len(ents) > 0 {
		var left []string
		for _, e := range ents {
			left = append(left, e.Name())
		}
		t.Errorf("temporary directories left behind: %v", left)
	}
	if s := stderr.String(); s != "" {
		t.Logf("stderr:\n%s", s)
	}
}

// TestMountCommandFailure: when a layer cannot be mounted, the layers
// mounted before it are unmounted and nothing is left behind.
func TestMountCommandFailure(t *testing.T) {
	if why := canMount(); why != "" {
		t.Skip(why)
	}
	reg := remotetest.NewRegistry(t)
	layers := testLayers(t)
	reg.PushImage(t, "app", "v1", layers[0])
	if _, _, err := run(t, append(hermetic(t), "convert", reg.Ref("app", "v1"), reg.Ref("app", "esgz"))...); err != nil {
		t.Fatal(err)
	}
	conv := parseManifest(t, getManifest(t, reg, "app", "esgz")).Layers[0]
	// An eStargz layer, then one that is not.
	reg.PushImage(t, "app", "mixed", remotetest.Layer{Data: reg.Blob(t, "app", conv.Digest), Annotations: conv.Annotations}, layers[1])

	base := t.TempDir()
	mnt, tmp := filepath.Join(base, "mnt"), filepath.Join(base, "tmp")
	os.Mkdir(mnt, 0o755)
	os.Mkdir(tmp, 0o755)
	t.Cleanup(func() {
		if err := mount.UnmountRecursive(base, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting what is left under %s: %v", base, err)
		}
	})
	out, errOut, code := runProcess(t, []string{"TMPDIR=" + tmp, "DOCKER_CONFIG=" + t.TempDir()},
		"mount", "--hosts-dir", t.TempDir(), "--cache-dir", filepath.Join(base, "cache"), reg.Ref("app", "mixed"), mnt)
	if code != 1 || out != "" || !strings.Contains(errOut, "layer 2") || !strings.Contains(errOut, "not eStargz") || !strings.Contains(errOut, "--fallback") {
		t.Errorf("exit %d, stdout %q, stderr %q; want exit 1 and a message naming layer 2", code, out, errOut)
	}
	if ms := mountsUnder(t, base); len(ms) > 0 {
		t.Errorf("left mounted: %v", ms)
	}
	if ents, _ := os.ReadDir(tmp); len(ents) > 0 {
		t.Errorf("temporary files left behind: %v", ents)
	}
}

func TestMountBlobArguments(t *testing.T) {
	dir := t.TempDir()
	_, _, err := run(t, "mount", "--cache-dir", t.TempDir(), "--blob", filepath.Join(dir, "missing.tar.gz"), dir)
	if err == nil || !strings.Contains(err.Error(), "missing.tar.gz") {
		t.Errorf("missing blob: %v", err)
	}
	var ue usageError
	if errors.As(err, &ue) {
		t.Errorf("missing blob is a usage error: %v", err)
	}
}
