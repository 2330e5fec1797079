package cache

import (
	"errors"
	"os"
	"syscall"
	"testing"

	"github.com/lazypull/lazypull/internal/faultfs"
)

// An entry whose file fails to read with an I/O error (here a real EIO,
// from a FUSE file standing in for a failing disk) is discarded and
// reported as a miss, so Has stops listing it and a caller fetches it
// again instead of finding it cached and failing on it forever. Adding it
// again works.
func TestIOErrorDiscards(t *testing.T) {
	for _, tc := range []struct {
		name    string
		restart bool // read first by a new store: the verification's read fails
	}{{"read", false}, {"verify", true}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			opts := Options{Dir: dir, MaxMemoryBytes: -1, MaxOpenFiles: -1}
			s := open(t, opts)
			d, data := entry(7, 64<<10)
			mustAdd(t, s, d, data)
			if tc.restart {
				s.Close()
			}
			p := pathOf(dir, d)
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(faultfs.EIOFile(t, int64(len(data))), p); err != nil {
				t.Fatal(err)
			}
			if tc.restart {
				// Open lists regular files only: put the entry back
				// as a regular file, then swap the symlink in.
				os.Remove(p)
				if err := os.WriteFile(p, data, 0o600); err != nil {
					t.Fatal(err)
				}
				s = open(t, opts)
				os.Remove(p)
				if err := os.Symlink(faultfs.EIOFile(t, int64(len(data))), p); err != nil {
					t.Fatal(err)
				}
			}
			_, err := s.ReadAt(d, make([]byte, 10), 0)
			wantMiss(t, err)
			if !errors.Is(err, syscall.EIO) {
				t.Errorf("error %v does not say EIO", err)
			}
			if s.Has(d) {
				t.Fatal("entry that failed with EIO still listed")
			}
			if st := s.Stats(); st.Corrupt != 1 || st.Disk.Entries != 0 {
				t.Errorf("stats %+v", st)
			}
			if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("discarded entry's name left behind: %v", err)
			}
			mustAdd(t, s, d, data)
			checkContent(t, s, d, data)
		})
	}
}

// A directory in an entry's place is discarded likewise.
func TestDirectoryInPlaceDiscards(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Options{Dir: dir, MaxMemoryBytes: -1, MaxOpenFiles: -1})
	d, data := entry(8, 4096) // a directory's size on ext4
	mustAdd(t, s, d, data)
	p := pathOf(dir, d)
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(p, 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := s.ReadAt(d, make([]byte, 10), 0)
	wantMiss(t, err)
	if s.Has(d) {
		t.Fatal("entry replaced by a directory still listed")
	}
	mustAdd(t, s, d, data)
	checkContent(t, s, d, data)
}
