package cache

import (
	"bytes"
	"errors"
	"fmt"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

func TestErrorClasses(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(Options{Dir: dir, MaxDiskBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	d := digest.FromString("absent")
	if _, err := s.ReadAt(d, make([]byte, 1), 0); !errors.Is(err, ErrNotFound) || !errdefs.IsNotFound(err) {
		t.Errorf("miss: %v, want ErrNotFound (not found)", err)
	}
	if _, err := s.ReadAt(d, make([]byte, 1), -1); !errdefs.IsInvalidArgument(err) {
		t.Errorf("negative offset: %v, want invalid argument", err)
	}
	big := bytes.Repeat([]byte{1}, 2<<20)
	if err := s.Add(digest.FromBytes(big), big); !errors.Is(err, ErrTooLarge) || !errdefs.IsResourceExhausted(err) {
		t.Errorf("entry over the limit: %v, want ErrTooLarge (resource exhausted)", err)
	}
	good := []byte("good bytes")
	err = s.AddFrom(digest.FromString("other bytes"), int64(len(good)), bytes.NewReader(good))
	if !errors.Is(err, ErrCorrupt) || !errdefs.IsDataLoss(err) {
		t.Errorf("AddFrom of bytes that do not match: %v, want ErrCorrupt (data loss)", err)
	}
	if _, err := Open(Options{Dir: dir}); !errors.Is(err, ErrLocked) || !errdefs.IsUnavailable(err) {
		t.Errorf("second Open of the directory: %v, want ErrLocked (unavailable)", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Add(digest.FromBytes(good), good); !errors.Is(err, ErrClosed) || !errdefs.IsUnavailable(err) {
		t.Errorf("Add after Close: %v, want ErrClosed (unavailable)", err)
	}
}

func TestClassifyWrite(t *testing.T) {
	full := fmt.Errorf("write /x: %w", syscall.ENOSPC)
	err := classifyWrite(full)
	if !errors.Is(err, syscall.ENOSPC) || !errdefs.IsResourceExhausted(err) || err.Error() != full.Error() {
		t.Errorf("ENOSPC classified as %v", err)
	}
	ro := fmt.Errorf("write /x: %w", syscall.EROFS)
	if err := classifyWrite(ro); err != ro {
		t.Errorf("EROFS classified as %v", err)
	}
}
