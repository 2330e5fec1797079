package fs_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// The layers of a three-layer image exercising overlay semantics:
// replacement, whiteouts of files, directories and one of several
// hardlinks, opaque directories, a file coming back after a whiteout, a
// directory replacing a file and the other way round.
func stackedLayers() [][]fixture.Entry {
	R, D := fixture.Reg, fixture.Dir
	l0 := []fixture.Entry{
		D("./", 0o755),
		D("etc/", 0o755),
		R("etc/passwd", 0o644, []byte("root:x:0:0::/root:/bin/sh\n")),
		R("etc/hostname", 0o644, []byte("bottom\n")),
		D("etc/conf.d/", 0o755),
		R("etc/conf.d/a.conf", 0o644, []byte("a=1\n")),
		R("etc/conf.d/b.conf", 0o644, []byte("b=1\n")),
		D("usr/", 0o755), D("usr/bin/", 0o755), D("usr/lib/", 0o755),
		R("usr/bin/tool", 0o755, fixture.Random(1, 50000)),
		R("usr/lib/libx.so", 0o644, fixture.Random(2, 9000)).X("user.origin", "l0"),
		fixture.Hardlink("usr/lib/libx.so.1", "usr/lib/libx.so"),
		D("var/", 0o755), D("var/cache/", 0o700).Own(33, 33),
		R("var/cache/stale1", 0o644, []byte("stale")),
		R("var/cache/stale2", 0o644, []byte("stale")),
		D("opt/", 0o755), D("opt/app/", 0o755),
		R("opt/app/config", 0o600, []byte("cfg")),
		D("home/", 0o755), D("home/user/", 0o700).Own(1000, 1000),
		R("home/user/.bashrc", 0o644, []byte("PS1=$\n")).Own(1000, 1000),
		D("data/", 0o755),
		R("data/old.txt", 0o644, []byte("old")),
		D("replaced/", 0o755),
		R("replaced/child", 0o644, []byte("child")),
		R("filetodir", 0o644, []byte("file")),
		fixture.Symlink("sym", "etc/passwd"),
		D("dev/", 0o755),
		fixture.Char("dev/null", 0o666, 1, 3),
	}
	l1 := []fixture.Entry{
		D("etc/", 0o750).At(fixture.Old),
		R("etc/hostname", 0o644, []byte("middle\n")),
		fixture.Whiteout("etc/conf.d", "b.conf"),
		D("var/", 0o755), D("var/cache/", 0o755),
		fixture.Opaque("var/cache"),
		R("var/cache/fresh", 0o644, []byte("fresh")),
		fixture.Whiteout("data", "old.txt"),
		R("replaced", 0o644, []byte("now a file")),
		D("filetodir/", 0o711),
		R("filetodir/inside", 0o644, []byte("inside")),
		D("usr/bin/", 0o755),
		R("usr/bin/newtool", 0o755, fixture.Random(3, 20000)).X("trusted.cap", "x").X("user.note", "new"),
		fixture.Whiteout("", "never-existed"),
		D("home/user/", 0o750).Own(1000, 1000),
		fixture.Opaque("home/user"),
		R("home/user/.profile", 0o644, []byte("profile")).Own(1000, 1000),
	}
	l2 := []fixture.Entry{
		R("etc/passwd", 0o644, []byte("root:x:0:0::/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\n")),
		fixture.Whiteout("", "opt"),
		R("data/old.txt", 0o644, []byte("back again")),
		fixture.Whiteout("usr/lib", "libx.so"),
		R("sym", 0o644, []byte("a file now")),
		fixture.Whiteout("dev", "null"),
		fixture.Fifo("dev/fifo", 0o600),
	}
	return [][]fixture.Entry{l0, l1, l2}
}

// A multi-layer image mounted the way `lazypull mount` does it (each
// layer through the Manager, stacked read-only with overlayfs) shows the
// merged tree.
func TestStackedImage(t *testing.T) {
	e := newEnv(t, envOptions{})
	layers := stackedLayers()
	convs := []converter{oursGzip, oursZstd, upstreamGzip}
	var pushed []remotetest.Layer
	var entries [][]fixture.Entry
	for i, l := range layers {
		fx := newFixture(t, l)
		entries = append(entries, fx.entries)
		b := convs[i].build(t, fx.tar, 4096, nil)
		pushed = append(pushed, remotetest.Layer{
			Data:        b.data,
			MediaType:   b.comp.MediaType(),
			Annotations: map[string]string{estargz.TOCDigestAnnotation: b.tocDigest.String()},
		})
		// Each layer on its own is what its tar says.
		dir, _ := e.mount(t, e.push(t, "stacked", b))
		compareTree(t, dir, fx.want, &fixture.DiffOptions{AllowExtra: fixture.Landmarks})
		if t.Failed() {
			t.FailNow()
		}
	}
	img := e.reg.PushImage(t, "stacked", "v1", pushed...)
	merged := mountImage(t, e, img.Ref)
	compareTree(t, merged, fixture.Merged(entries...), &fixture.DiffOptions{IgnoreDirNlink: true, AllowExtra: fixture.Landmarks})
	mustRead(t, filepath.Join(merged, "usr/lib/libx.so.1"), fixture.Random(2, 9000))
}

// An image converted by package convert (from an ordinary gzip image on
// the same registry) mounts as the merge of its source layers.
func TestConvertedImage(t *testing.T) {
	e := newEnv(t, envOptions{})
	layers := stackedLayers()[:2]
	var src []remotetest.Layer
	var entries [][]fixture.Entry
	for _, l := range layers {
		tb := fixture.Tar(t, l)
		entries = append(entries, fixture.Read(t, tb))
		src = append(src, remotetest.Layer{Data: fixture.Gzip(t, tb), DiffID: digest.FromBytes(tb)})
	}
	img := e.reg.PushImage(t, "plain", "v1", src...)
	ctx := context.Background()
	from, err := convert.OpenStore(img.Ref, e.client)
	if err != nil {
		t.Fatal(err)
	}
	dstRef := e.reg.Ref("converted", "v1")
	to, err := convert.OpenStore(dstRef, e.client)
	if err != nil {
		t.Fatal(err)
	}
	res, err := convert.Convert(ctx, from, to, convert.Options{
		Build: estargz.BuildOptions{ChunkSize: 4096, Level: 1}, TempDir: t.TempDir(),
	})
	if err != nil {
		t.Fatalf("Convert: %v", err)
	}
	if len(res.Layers) != 2 {
		t.Fatalf("converted %d layers", len(res.Layers))
	}
	merged := mountImage(t, e, dstRef)
	compareTree(t, merged, fixture.Merged(entries...), &fixture.DiffOptions{IgnoreDirNlink: true, AllowExtra: fixture.Landmarks})
}

// mountImage resolves ref, mounts its layers through e's Manager and
// stacks them with overlayfs at a new directory, as `lazypull mount`
// does.
func mountImage(t *testing.T, e *env, ref string) string {
	t.Helper()
	img, err := e.client.Resolve(context.Background(), ref, nil)
	if err != nil {
		t.Fatalf("Resolve %s: %v", ref, err)
	}
	var lowers []string
	for i, l := range img.Manifest.Layers {
		toc := l.Annotations[estargz.TOCDigestAnnotation]
		if toc == "" {
			t.Fatalf("layer %d of %s has no TOC digest", i, ref)
		}
		dir, _ := e.mount(t, lfs.LayerSource{Ref: img.Ref, Digest: l.Digest, Size: l.Size, TOCDigest: digest.Digest(toc)})
		lowers = append(lowers, dir)
	}
	return stack(t, lowers)
}

// stack mounts lowers (bottom first) read-only with overlayfs.
func stack(t *testing.T, lowers []string) string {
	t.Helper()
	top := make([]string, len(lowers))
	for i, l := range lowers {
		top[len(lowers)-1-i] = l
	}
	dir := filepath.Join(t.TempDir(), "merged")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	m := mount.Mount{Type: "overlay", Source: "overlay", Options: []string{"ro", "lowerdir=" + strings.Join(top, ":")}}
	if err := m.Mount(dir); err != nil {
		t.Fatalf("mounting overlay: %v", err)
	}
	t.Cleanup(func() {
		closeLeaked(t, dir)
		if err := mount.UnmountAll(dir, 0); err != nil {
			t.Errorf("unmounting overlay: %v", err)
		}
	})
	return dir
}
