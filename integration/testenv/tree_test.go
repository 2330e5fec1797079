package testenv

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func mustTar(t *testing.T, l *Layer) []byte {
	t.Helper()
	b, err := l.Tar()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestLayerAddsParents(t *testing.T) {
	l := NewLayer().File("a/b/c", "x").Dir("a/d")
	var names []string
	for _, e := range l.Entries() {
		names = append(names, e.Header.Name)
	}
	if got, want := strings.Join(names, " "), "a/ a/b/ a/b/c a/d/"; got != want {
		t.Fatalf("entries %q, want %q", got, want)
	}
}

func TestLayerHardlinkNeedsRegularTarget(t *testing.T) {
	if _, err := NewLayer().Dir("d").Hardlink("l", "d").Tar(); err == nil {
		t.Fatal("hard link to a directory accepted")
	}
	if _, err := NewLayer().Hardlink("l", "missing").Tar(); err == nil {
		t.Fatal("hard link to a missing file accepted")
	}
}

func TestExpectedTree(t *testing.T) {
	t1 := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	l1 := NewLayer().
		File("keep", "1").
		File("gone", "1").
		File("d/x", "1").
		File("d/sub/y", "1").
		File("o/x", "1").
		File("h1", "h", Owner(3, 4), Xattr("user.a", "b")).
		Hardlink("h2", "h1").
		Hardlink("h3", "h1").
		Dir("dir2file").File("dir2file/z", "1").
		File("file2dir", "1").
		Symlink("s", "keep", Xattr("user.dropped", "1"), ModTime(t1))
	l2 := NewLayer().
		File("o/same-layer-before", "2").
		Opaque("o").
		File("o/new", "2").
		Whiteout("gone").
		Whiteout("d").
		Whiteout("h3").
		File("dir2file", "2").
		Dir("file2dir", Mode(0o700)).
		File("file2dir/in", "2").
		File("keep", "2", Mode(0o600))
	tree, err := ExpectedTree(mustTar(t, l1), mustTar(t, l2))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/gone", "/d", "/d/x", "/d/sub/y", "/o/x", "/h3", "/dir2file/z"} {
		if tree[p] != nil {
			t.Errorf("%s should be gone: %v", p, tree[p])
		}
	}
	want := map[string]string{
		"/keep":                 "reg     0600 0:0 size=1",
		"/o":                    "dir     0755 0:0",
		"/o/new":                "reg     0644 0:0 size=1",
		"/o/same-layer-before":  "reg     0644 0:0 size=1",
		"/h1":                   "reg     0644 3:4 size=1",
		"/h2":                   "reg     0644 3:4 size=1",
		"/dir2file":             "reg     0644 0:0 size=1",
		"/file2dir":             "dir     0700 0:0",
		"/file2dir/in":          "reg     0644 0:0 size=1",
		"/s":                    "symlink 0777 0:0 -> keep mtime=2020-01-01T00:00:00Z",
		"/h1 hardlink":          "/h1",
		"/h2 hardlink":          "/h1",
		"/h2 xattrs":            `{user.a="b"}`,
		"/s xattrs":             "",
		"/o/new hardlink":       "",
		"/file2dir/in hardlink": "",
	}
	for k, w := range want {
		p, field, _ := strings.Cut(k, " ")
		n := tree[p]
		if n == nil {
			t.Errorf("%s missing", p)
			continue
		}
		var got string
		switch field {
		case "":
			got = n.String()
		case "hardlink":
			got = n.Hardlink
		case "xattrs":
			if len(n.Xattrs) > 0 {
				got = formatXattrs(n.Xattrs)
			}
		}
		if field == "" && !strings.HasPrefix(got, w) || field != "" && got != w {
			t.Errorf("%s: got %q, want %q", k, got, w)
		}
	}
	if len(tree) != 10 {
		t.Errorf("want 10 paths, got %d:\n%s", len(tree), tree)
	}
}

func TestDiff(t *testing.T) {
	a := Tree{
		"/same": {Path: "/same", Type: "reg", Mode: 0o644, Digest: "sha256:aa"},
		"/mode": {Path: "/mode", Type: "dir", Mode: 0o755, ModTime: time.Unix(1, 0)},
		"/gone": {Path: "/gone", Type: "fifo"},
		"/dev":  {Path: "/dev", Type: "dir"},
	}
	b := Tree{
		"/same":    {Path: "/same", Type: "reg", Mode: 0o644, Digest: "sha256:aa"},
		"/mode":    {Path: "/mode", Type: "dir", Mode: 0o700, ModTime: time.Unix(2, 0)},
		"/extra":   {Path: "/extra", Type: "symlink", Link: "x"},
		"/dev/tty": {Path: "/dev/tty", Type: "char"},
	}
	got := strings.Join(Diff(a, b, &DiffOptions{IgnorePaths: []string{"/dev"}, IgnoreDirModTime: true}), "\n")
	want := strings.Join([]string{
		"+ /extra: unexpected (symlink 0000 0:0 -> x mtime=0001-01-01T00:00:00Z)",
		"- /gone: missing (want fifo    0000 0:0 mtime=0001-01-01T00:00:00Z)",
		"~ /mode: mode want 0755, got 0700",
	}, "\n")
	if got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
	if d := Diff(a, a, nil); len(d) != 0 {
		t.Fatalf("a tree differs from itself: %v", d)
	}
}

func TestWalkTree(t *testing.T) {
	dir := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(filepath.Join(dir, "f"), []byte("hello"), 0o640))
	must(os.Link(filepath.Join(dir, "f"), filepath.Join(dir, "g")))
	must(os.Symlink("f", filepath.Join(dir, "s")))
	must(unix.Mkfifo(filepath.Join(dir, "p"), 0o600))
	must(os.Mkdir(filepath.Join(dir, "d"), 0o711))
	must(unix.Setxattr(filepath.Join(dir, "d"), "user.k", []byte("v"), 0))
	must(unix.Setxattr(filepath.Join(dir, "d"), "trusted.overlay.opaque", []byte("y"), 0))
	mt := time.Date(2001, 2, 3, 4, 5, 6, 7, time.UTC)
	must(os.Chtimes(filepath.Join(dir, "f"), mt, mt))
	tree, err := WalkTree(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"/d": `dir     0711 0:0 mtime=`,
		"/f": `reg     0640 0:0 size=5 sha256:2cf24dba5fb0 mtime=2001-02-03T04:05:06.000000007Z hardlink=/f`,
		"/g": `reg     0640 0:0 size=5 sha256:2cf24dba5fb0 mtime=2001-02-03T04:05:06.000000007Z hardlink=/f`,
		"/s": `symlink 0777 0:0 -> f mtime=`,
		"/p": `fifo    0600 0:0 mtime=`,
	}
	if len(tree) != len(want) {
		t.Fatalf("got %d nodes:\n%s", len(tree), tree)
	}
	for p, w := range want {
		if n := tree[p]; n == nil || !strings.HasPrefix(n.String(), w) {
			t.Errorf("%s: got %v, want prefix %q", p, n, w)
		}
	}
	if x := formatXattrs(tree["/d"].Xattrs); x != `{user.k="v"}` {
		t.Errorf("/d xattrs %s (overlay's own must be hidden)", x)
	}
}

func TestMissingBinaryIsAnError(t *testing.T) {
	v := Containerd2()
	v.Binary = "/nonexistent/containerd"
	_, err := StartContainerd(context.Background(), ContainerdConfig{Version: v})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/containerd") || !strings.Contains(err.Error(), "install-deps.sh") {
		t.Fatalf("want an error naming the binary and the installer, got %v", err)
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	if got := unescapeMountinfo(`/a\040b\011c\134d`); got != "/a b\tc\\d" {
		t.Fatalf("got %q", got)
	}
	if got := unescapeMountinfo(`/plain`); got != "/plain" {
		t.Fatalf("got %q", got)
	}
}
