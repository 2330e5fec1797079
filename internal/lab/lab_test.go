package lab

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"
)

func TestMissingBinaryIsAnError(t *testing.T) {
	v := Containerd2()
	v.Binary = "/nonexistent/containerd"
	_, err := StartContainerd(context.Background(), ContainerdConfig{Version: v})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/containerd") || !strings.Contains(err.Error(), "install-deps.sh") {
		t.Fatalf("want an error naming the binary and the installer, got %v", err)
	}
}

// unmountUnder leaves nothing mounted at or below a directory, stacked and
// nested mounts included, and MountedUnder sees them until then.
func TestUnmountUnder(t *testing.T) {
	dir := t.TempDir()
	inner := filepath.Join(dir, "a b", "inner") // a space: mountinfo escapes it
	if err := os.MkdirAll(inner, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, mp := range []string{dir, dir, inner} {
		if mp == inner {
			if err := os.MkdirAll(inner, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := unix.Mount("tmpfs", mp, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatalf("mount tmpfs at %s: %v", mp, err)
		}
	}
	t.Cleanup(func() { mount.UnmountRecursive(dir, unix.MNT_DETACH) })
	got, err := MountedUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	if want := []string{dir, dir, inner}; !slices.Equal(got, want) {
		t.Fatalf("MountedUnder: %q, want %q", got, want)
	}
	if err := unmountUnder(dir); err != nil {
		t.Fatal(err)
	}
	if got, err := MountedUnder(dir); err != nil || len(got) > 0 {
		t.Fatalf("after unmountUnder: %q, %v", got, err)
	}
}
