package fs_test

import (
	"bytes"
	"github.com/opencontainers/go-digest"
	"io"
	"log"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	clog "github.com/containerd/log"
	"golang.org/x/sys/unix"

	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
)

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// since returns what was logged after the first mark bytes.
func (s *syncBuffer) since(mark int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()[mark:]
}

// waitClosed waits until the daemon has seen a RELEASE for every file it
// opened: the kernel sends it after the last close, asynchronously, and an
// open's kind depends on the handles the daemon knows to be open.
func (s *syncBuffer) waitClosed(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		l := s.since(base)
		if strings.Count(l, ": OPEN ") == strings.Count(l, ": RELEASE ") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("files opened on the mount were never released")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (s *syncBuffer) mark() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Len()
}

// With MountOptions.Passthrough, a single-chunk file whose chunk is on disk
// is read by the kernel straight from the cache file, and a multi-chunk file
// whose chunks are all cached from a whole-file entry assembled from them:
// no FUSE READ reaches the daemon. Everything else (chunks not cached yet, a
// memory-only store, a kernel that refuses the backing file) falls back to
// ordinary reads. The FUSE debug log (go-fuse writes it to the standard
// logger) tells which path a read took.
func TestPassthrough(t *testing.T) {
	var logs syncBuffer
	log.SetOutput(&logs)
	t.Cleanup(func() { log.SetOutput(os.Stderr) })

	fx := newFixture(t, []fixture.Entry{
		fixture.Reg("single", 0o644, fixture.Random(70, 10000)),
		fixture.Reg("other", 0o644, fixture.Random(71, 3000)),
		fixture.Reg("multi", 0o644, fixture.Random(72, 200000)),
		fixture.Hardlink("single-link", "single"),
	})
	b := oursGzip.build(t, fx.tar, 64<<10, nil)
	opts := lfs.ManagerOptions{Mount: lfs.MountOptions{Passthrough: true, Debug: true}}

	// read reads p and returns the FUSE requests it caused.
	base := 0 // each subtest's first log line
	read := func(t *testing.T, dir, p string) string {
		t.Helper()
		logs.waitClosed(t, base)
		m := logs.mark()
		mustRead(t, filepath.Join(dir, p), fx.want[p].Data)
		return logs.since(m)
	}
	const fuseRead, passthrough = ": READ ", " PASSTHROUGH}"

	t.Run("disk store", func(t *testing.T) {
		base = logs.mark()
		e := newEnv(t, envOptions{manager: opts})
		dir, _ := e.mount(t, e.push(t, "passthrough", b))
		// Not cached yet: read through FUSE, which caches it.
		if l := read(t, dir, "single"); !strings.Contains(l, fuseRead) || strings.Contains(l, passthrough) {
			t.Errorf("uncached file: want a FUSE read and no passthrough:\n%s", l)
		}
		for _, p := range []string{"single", "single-link"} {
			if l := read(t, dir, p); strings.Contains(l, fuseRead) || !strings.Contains(l, passthrough) {
				t.Errorf("%s cached: want passthrough and no FUSE read:\n%s", p, l)
			}
		}
		// mmap of a passthrough file.
		f, err := os.Open(filepath.Join(dir, "single"))
		if err != nil {
			t.Fatal(err)
		}
		mm, err := unix.Mmap(int(f.Fd()), 0, 10000, unix.PROT_READ, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(mm, fx.want["single"].Data) {
			t.Error("mmap of a passthrough file shows wrong bytes")
		}
		unix.Munmap(mm)
		f.Close()
		// A multi-chunk file reads through FUSE until all its chunks
		// are cached; then an open assembles it into a whole-file cache
		// entry (keyed and verified by the file digest) for passthrough.
		// (Read-ahead for "single" may have cached its chunks already.)
		read(t, dir, "multi")
		if l := read(t, dir, "multi"); strings.Contains(l, fuseRead) || !strings.Contains(l, passthrough) {
			t.Errorf("cached multi-chunk file: want passthrough and no FUSE read:\n%s", l)
		}
		if !e.store.Has(digest.FromBytes(fx.want["multi"].Data)) {
			t.Error("no whole-file cache entry for the multi-chunk file")
		}
	})

	t.Run("memory store", func(t *testing.T) {
		base = logs.mark()
		e := newEnv(t, envOptions{manager: opts, memOnly: true})
		dir, _ := e.mount(t, e.push(t, "passthrough", b))
		read(t, dir, "single")
		if l := read(t, dir, "single"); !strings.Contains(l, fuseRead) || strings.Contains(l, passthrough) {
			t.Errorf("memory store: want a FUSE read and no passthrough:\n%s", l)
		}
	})

	// A cache directory on overlayfs is one level of stacking too many for
	// a FUSE backing file (max_stack_depth 1): the kernel refuses it, and
	// reads are served by the daemon from the open cache file.
	t.Run("kernel refuses", func(t *testing.T) {
		base = logs.mark()
		base := t.TempDir()
		for _, d := range []string{"lower", "upper", "work", "merged"} {
			if err := os.Mkdir(filepath.Join(base, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		ovl := filepath.Join(base, "merged")
		m := mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
			"lowerdir=" + filepath.Join(base, "lower"), "upperdir=" + filepath.Join(base, "upper"), "workdir=" + filepath.Join(base, "work")}}
		if err := m.Mount(ovl); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { mount.UnmountAll(ovl, 0) })
		var warnings syncBuffer
		clog.L.Logger.SetOutput(&warnings)
		defer clog.L.Logger.SetOutput(os.Stderr)
		e := newEnv(t, envOptions{manager: opts, cacheDir: ovl})
		dir, _ := e.mount(t, e.push(t, "passthrough", b))
		read(t, dir, "single")
		l := read(t, dir, "single")
		if !strings.Contains(l, "BACKING_OPEN") || strings.Contains(l, "(errno 0)") || !strings.Contains(l, fuseRead) || strings.Contains(l, passthrough) {
			t.Errorf("backing file refused: want a refused BACKING_OPEN and a FUSE read:\n%s", l)
		}
		read(t, dir, "other")
		read(t, dir, "other")
		if w := warnings.since(0); strings.Count(w, "passthrough refused") != 1 {
			t.Errorf("want one warning about passthrough being refused, got:\n%s", w)
		}
	})
}

// The kernel refuses (EIO) to open an inode for passthrough while it is
// open for cached reads, and the other way round. A binary that is mapped
// by a running program since before its chunks were cached is the common
// case: exec'ing it again must not ask for passthrough.
func TestPassthroughFollowsOpenMode(t *testing.T) {
	var logs syncBuffer
	log.SetOutput(&logs)
	t.Cleanup(func() { log.SetOutput(os.Stderr) })
	fx := newFixture(t, []fixture.Entry{
		fixture.Reg("bin", 0o755, fixture.Random(80, 20000)),
	})
	b := oursGzip.build(t, fx.tar, 64<<10, nil)
	e := newEnv(t, envOptions{manager: lfs.ManagerOptions{Mount: lfs.MountOptions{Passthrough: true, Debug: true}}})
	dir, _ := e.mount(t, e.push(t, "openmode", b))
	p := filepath.Join(dir, "bin")
	want := fx.want["bin"].Data

	// First open: not cached yet, so a cached-mode handle; keep it.
	held, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(held)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("first read: %v", err)
	}
	// Now cached: a second open while the first is held must work and
	// must not be passthrough.
	m := logs.mark()
	mustRead(t, p, want)
	if l := logs.since(m); strings.Contains(l, " PASSTHROUGH}") {
		t.Errorf("open beside a cached-mode handle asked for passthrough:\n%s", l)
	}
	held.Close()
	logs.waitClosed(t, 0)
	// With no handle open, the next open is passthrough; while it is
	// held, further opens are passthrough too.
	m = logs.mark()
	held, err = os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	mustRead(t, p, want)
	if l := logs.since(m); strings.Count(l, " PASSTHROUGH}") < 2 {
		t.Errorf("opens of a cached file with no cached-mode handle: want passthrough for both:\n%s", l)
	}
}
