package fs_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/cache"
	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
)

// overlayfs acts on trusted.overlay.* and user.overlay.* attributes of its
// lower layers (redirects, opaque markers, metacopy). An image carrying them
// in its TOC must not steer the overlay stacked on the layer: the mount
// serves none of them, only the opaque marker derived from .wh..wh..opq.
func TestOverlayXattrsFromTheImageAreHidden(t *testing.T) {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	hdrs := []*tar.Header{
		{Typeflag: tar.TypeDir, Name: "redirected/", Mode: 0o755, Format: tar.FormatPAX, PAXRecords: map[string]string{
			"SCHILY.xattr.trusted.overlay.redirect": "/etc",
			"SCHILY.xattr.user.overlay.opaque":      "y",
			"SCHILY.xattr.user.kept":                "v",
		}},
		{Typeflag: tar.TypeReg, Name: "redirected/f", Mode: 0o644, Size: 2, Format: tar.FormatPAX, PAXRecords: map[string]string{
			"SCHILY.xattr.trusted.overlay.metacopy": "",
			"SCHILY.xattr.trusted.overlay.origin":   "x",
		}},
		{Typeflag: tar.TypeDir, Name: "opaque/", Mode: 0o755, Format: tar.FormatPAX, PAXRecords: map[string]string{
			"SCHILY.xattr.trusted.overlay.opaque": "x",
		}},
		{Typeflag: tar.TypeReg, Name: "opaque/.wh..wh..opq", Mode: 0o644},
	}
	for _, h := range hdrs {
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			if _, err := tw.Write([]byte("ok")); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	dir, _ := mountLocalTar(t, tb.Bytes())

	get := func(p, name string) (string, error) {
		buf := make([]byte, 256)
		n, err := unix.Lgetxattr(filepath.Join(dir, p), name, buf)
		if err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	for _, c := range []struct{ path, name string }{
		{"redirected", "trusted.overlay.redirect"},
		{"redirected", "user.overlay.opaque"},
		{"redirected/f", "trusted.overlay.metacopy"},
		{"redirected/f", "trusted.overlay.origin"},
	} {
		if v, err := get(c.path, c.name); !errors.Is(err, unix.ENODATA) {
			t.Errorf("getxattr %s %s = %q, %v; want ENODATA", c.path, c.name, v, err)
		}
	}
	if v, err := get("redirected", "user.kept"); err != nil || v != "v" {
		t.Errorf("getxattr redirected user.kept = %q, %v; want \"v\"", v, err)
	}
	// The opaque marker is lazypull's own, from .wh..wh..opq, with its own
	// value, not the image's.
	if v, err := get("opaque", "trusted.overlay.opaque"); err != nil || v != "y" {
		t.Errorf("getxattr opaque trusted.overlay.opaque = %q, %v; want \"y\"", v, err)
	}
	buf := make([]byte, 1024)
	n, err := unix.Llistxattr(filepath.Join(dir, "redirected"), buf)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(buf[:n]); got != "user.kept\x00" {
		t.Errorf("listxattr redirected = %q, want only user.kept", got)
	}
}

// mountLocalTar converts a tar to an eStargz blob file and mounts it
// through FUSE from the file, with a memory-only cache; the mount goes
// away with the test.
func mountLocalTar(t *testing.T, tarball []byte) (string, *lfs.Mount) {
	t.Helper()
	blob := filepath.Join(t.TempDir(), "layer.tar.gz")
	f, err := os.Create(blob)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := estargz.Build(context.Background(), f, bytes.NewReader(tarball), estargz.BuildOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	store, err := cache.Open(cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	l, closeBlob, err := lfs.OpenLocalLayer(blob, store, lfs.LayerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeBlob() })
	dir := t.TempDir()
	m, err := lfs.MountLayer(dir, l, lfs.MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Unmount() })
	return dir, m
}

// A layer unmounted from outside (umount -l) fails Check, so that the
// snapshotter mounts it again; a failed layer fails Check and every read.
func TestCheckSeesExternalUnmountAndFailure(t *testing.T) {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "f", Mode: 0o644, Size: 2})
	tw.Write([]byte("ok"))
	tw.Close()

	dir, m := mountLocalTar(t, tb.Bytes())
	if err := m.Check(context.Background()); err != nil {
		t.Fatalf("Check of a healthy mount: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "f")); err != nil || string(b) != "ok" {
		t.Fatalf("read %q, %v", b, err)
	}
	m.Fail(errors.New("test says so"))
	if _, err := os.ReadFile(filepath.Join(dir, "f")); err == nil {
		t.Error("a failed layer still reads (page cache not dropped, or reads not failed)")
	}
	if err := m.Check(context.Background()); !errors.Is(err, lfs.ErrLayerFailed) {
		t.Errorf("Check of a failed layer: %v", err)
	}

	dir2, m2 := mountLocalTar(t, tb.Bytes())
	if err := unix.Unmount(dir2, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := m2.Check(context.Background()); err == nil {
		t.Error("Check does not see a layer unmounted from outside")
	}
}
