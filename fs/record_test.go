package fs_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	lfs "github.com/lazypull/lazypull/fs"
)

// A ReadLog records, per image, each file the first time it is opened or
// read, in order: not stats or listings, not repeated reads, hardlinked
// names as the file's first name. The log is what a prioritized build
// takes, and it prefetches those files.
func TestReadLog(t *testing.T) {
	logDir := t.TempDir()
	rl, err := lfs.NewReadLog(logDir)
	if err != nil {
		t.Fatal(err)
	}
	defer rl.Close()
	e := newEnv(t, envOptions{manager: lfs.ManagerOptions{Recorder: rl}})
	fx := newFixture(t, fetchLayer())
	src := e.push(t, "record", oursGzip.build(t, fx.tar, fetchChunk, nil))
	dir, _ := e.mount(t, src)
	for _, p := range []string{"etc/conf", "app/start", "app/lib/big.1", "etc/conf", "app/lib/big"} {
		mustRead(t, filepath.Join(dir, p), fx.want[p].Data)
	}
	if _, err := os.Stat(filepath.Join(dir, "app/other")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadDir(filepath.Join(dir, "rest")); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(logDir, lfs.RecordFileName(src.Ref)))
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Fields(string(b))
	want := []string{"etc/conf", "app/start", "app/lib/big"}
	if !slices.Equal(got, want) {
		t.Fatalf("read log %q, want %q", got, want)
	}

	// Built with the log as its prioritized files, the layer prefetches
	// exactly those.
	p := newEnv(t, envOptions{manager: lfs.ManagerOptions{Fetch: lfs.FetchOptions{Prefetch: true}}})
	psrc := p.push(t, "recorded", oursGzip.build(t, fx.tar, fetchChunk, got))
	_, m := p.mount(t, psrc)
	m.Layer().WaitFetching()
	for _, f := range want {
		for _, d := range chunkDigests(t, m.Layer(), f) {
			if !p.store.Has(d) {
				t.Errorf("%s: not prefetched", f)
			}
		}
	}
	for _, d := range chunkDigests(t, m.Layer(), "app/other") {
		if p.store.Has(d) {
			t.Error("app/other prefetched")
		}
	}
}
