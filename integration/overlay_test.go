package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"math/rand"
	"strings"
	"testing"
	"time"

	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/internal/lab"
)

// blobContent is a 1 MiB deterministic pseudo-random payload.
func blobContent() []byte {
	b := make([]byte, 1<<20)
	rand.New(rand.NewSource(42)).Read(b)
	return b
}

// threeLayerImage builds busybox plus two layers that exercise everything
// a snapshotter must get right in the merged view: replaced files, whiteouts
// of files and of whole directories, an opaque directory, hard links (one
// group cut by a whiteout), symlinks (relative, absolute, replaced by a
// file), xattrs, devices, fifos, setuid, owners and mtimes, and type changes
// (dir -> file, file -> dir).
func threeLayerImage(t *testing.T) *fixture.Image {
	t.Helper()
	t1 := time.Date(2020, 5, 6, 7, 8, 9, 0, time.UTC)
	t2 := time.Date(2019, 1, 1, 0, 0, 0, 0, time.UTC)

	base, err := fixture.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	base.
		File("etc/greeting", "hello from layer 1\n").
		Symlink("etc/greeting.link", "greeting").
		Dir("data", fixture.Mode(0o750), fixture.Owner(1000, 1000), fixture.ModTime(t1)).
		FileBytes("data/blob", blobContent(), fixture.Mode(0o640), fixture.Owner(1000, 1000),
			fixture.ModTime(t1), fixture.Xattr("user.foo", "bar")).
		File("data/hard1", "shared by two names\n", fixture.Xattr("user.links", "2")).
		Hardlink("data/hard2", "data/hard1").
		File("data/keep", "a file that becomes a directory\n").
		File("data/gone", "deleted in layer 2\n").
		File("data/dir/sub/file", "a subtree deleted in layer 2\n").
		File("opq/a", "hidden by the opaque dir\n").
		File("opq/sub/b", "hidden too\n").
		Dir("xdir", fixture.Xattr("user.dirattr", "1"), fixture.ModTime(t2)).
		File("xdir/child", "a dir that becomes a file\n").
		CharDevice("misc/char", 1, 3).
		BlockDevice("misc/block", 7, 0).
		Fifo("misc/fifo", fixture.Mode(0o600)).
		Symlink("misc/abs", "/etc/greeting").
		File("misc/suid", "#!/bin/sh\necho suid\n", fixture.Mode(0o4755), fixture.Owner(0, 42))

	l2 := fixture.NewLayer().
		File("etc/greeting", "hello from layer 2\n").
		Whiteout("data/gone").
		Whiteout("data/dir").
		Opaque("opq").
		File("opq/new", "added with the opaque marker\n").
		File("data/hard3", "a second link group\n", fixture.Owner(7, 8)).
		Hardlink("data/hard4", "data/hard3").
		File("misc/abs", "a symlink replaced by a file\n").
		File("newdir/file", "new in layer 2\n")

	l3 := fixture.NewLayer().
		Whiteout("data/hard2").
		File("xdir", "was a directory\n").
		Dir("data/keep", fixture.Mode(0o700)).
		File("data/keep/inner", "was a file\n").
		File("etc/motd", "layer 3\n", fixture.Xattr("user.motd", "yes"), fixture.ModTime(t1))

	img, err := fixture.BuildImage(fixture.DefaultConfig(), base, l2, l3)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// checkExpectedTree guards against a vacuous comparison: the fixture's
// expected tree must itself show the effects the layers were built for.
func checkExpectedTree(t *testing.T, want fixture.Tree) {
	t.Helper()
	for _, p := range []string{"data/gone", "data/dir", "data/dir/sub/file", "opq/a", "opq/sub", "data/hard2", "xdir/child"} {
		if want[p] != nil {
			t.Errorf("expected tree has %s, which a whiteout removes", p)
		}
	}
	checks := map[string]func(n *fixture.Node) bool{
		"etc/greeting": func(n *fixture.Node) bool { return n.Size == int64(len("hello from layer 2\n")) },
		"opq/new":      func(n *fixture.Node) bool { return n.Kind == "reg" },
		"data/hard1":   func(n *fixture.Node) bool { return n.Hardlink == "" && n.Xattrs["user.links"] == "2" },
		"data/hard4":   func(n *fixture.Node) bool { return n.Hardlink == "data/hard3" && n.UID == 7 },
		"data/keep":    func(n *fixture.Node) bool { return n.Kind == "dir" && n.Mode == 0o700 },
		"xdir":         func(n *fixture.Node) bool { return n.Kind == "reg" },
		"misc/abs":     func(n *fixture.Node) bool { return n.Kind == "reg" },
		"misc/char":    func(n *fixture.Node) bool { return n.Kind == "char" && n.Major == 1 && n.Minor == 3 },
		"misc/suid":    func(n *fixture.Node) bool { return n.Mode == 0o4755 && n.GID == 42 },
		"data/blob":    func(n *fixture.Node) bool { return n.Xattrs["user.foo"] == "bar" && n.UID == 1000 },
		"bin/sh":       func(n *fixture.Node) bool { return n.Kind == "symlink" && n.Target == "busybox" },
		"etc/greeting.link": func(n *fixture.Node) bool {
			return n.Kind == "symlink" && n.Target == "greeting"
		},
	}
	for p, ok := range checks {
		if n := want[p]; n == nil || !ok(n) {
			t.Errorf("expected tree: unexpected %s: %v", p, n)
		}
	}
}

// TestOverlayfsPullRun pushes the fixture image, pulls it with the
// built-in overlayfs snapshotter, runs containers from it and compares the
// rootfs with the tree computed from the layer tars.
func TestOverlayfsPullRun(t *testing.T) {
	img := threeLayerImage(t)
	want, err := img.ExpectedTree()
	if err != nil {
		t.Fatal(err)
	}
	checkExpectedTree(t, want)
	reg := lab.NewRegistry(t)

	forEachVersion(t, func(t *testing.T, v lab.Version) {
		c := sharedContainerd(t, v)
		ctx := c.Namespace(t)
		ref, err := reg.Push(ctx, "overlay/three-layers:"+v.Name, img)
		if err != nil {
			t.Fatal(err)
		}
		image, err := c.Pull(ctx, ref, lab.DefaultSnapshotter)
		if err != nil {
			t.Fatal(err)
		}
		if got := image.Target().Digest; got != img.Descriptor().Digest {
			t.Fatalf("pulled manifest %s, pushed %s", got, img.Descriptor().Digest)
		}

		t.Run("cat", func(t *testing.T) {
			res, err := c.Run(ctx, image, lab.RunOptions{Args: []string{"cat", "/etc/greeting", "/etc/greeting.link"}})
			if err != nil {
				t.Fatal(err)
			}
			if want := "hello from layer 2\nhello from layer 2\n"; res.ExitCode != 0 || res.Stdout != want {
				t.Fatalf("want exit 0 and %q, got %s", want, res)
			}
		})

		t.Run("sha256sum", func(t *testing.T) {
			sum := sha256.Sum256(blobContent())
			res, err := c.Run(ctx, image, lab.RunOptions{Args: []string{"sha256sum", "/data/blob"}})
			if err != nil {
				t.Fatal(err)
			}
			if want := hex.EncodeToString(sum[:]) + "  /data/blob\n"; res.ExitCode != 0 || res.Stdout != want {
				t.Fatalf("want exit 0 and %q, got %s", want, res)
			}
		})

		t.Run("shell", func(t *testing.T) {
			// What a process sees of whiteouts, opaque dirs and hard links.
			script := `set -e
for p in /data/gone /data/dir /opq/a /opq/sub /data/hard2 /xdir/child; do
	if [ -e "$p" ]; then echo "present: $p"; fi
done
ls /opq
cat /data/keep/inner /misc/abs
[ "$(stat -c %i /data/hard3)" = "$(stat -c %i /data/hard4)" ] && echo same-inode
stat -c '%a %u:%g %F' /misc/suid /data/blob /misc/fifo /misc/char
echo "$GREETING"
exit 3`
			res, err := c.Run(ctx, image, lab.RunOptions{
				Args: []string{"sh", "-c", script},
				Env:  []string{"GREETING=hi from env"},
			})
			if err != nil {
				t.Fatal(err)
			}
			want := strings.Join([]string{
				"new",
				"was a file",
				"a symlink replaced by a file",
				"same-inode",
				"4755 0:42 regular file",
				"640 1000:1000 regular file",
				"600 0:0 fifo",
				"666 0:0 character special file",
				"hi from env",
				"",
			}, "\n")
			if res.ExitCode != 3 || res.Stdout != want {
				t.Fatalf("want exit 3 and\n%s\ngot %s", want, res)
			}
		})

		t.Run("rootfs", func(t *testing.T) {
			got, err := c.ImageTree(ctx, image, lab.DefaultSnapshotter)
			if err != nil {
				t.Fatal(err)
			}
			if d := fixture.Diff(want, got, nil); len(d) > 0 {
				t.Fatalf("rootfs differs from the layers' merged tree (- want, + got):\n%s", fixture.FormatDiff(d, 50))
			}
		})
	})
}
