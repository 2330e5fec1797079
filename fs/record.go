package fs

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/opencontainers/go-digest"
)

// ReadLog records the paths of files as they are first read, one per line,
// in a file per image reference under a directory. Lines are written as
// they happen (unbuffered), so the log can be read while the image runs.
// Its files are what `lazypull convert --prioritize` takes.
type ReadLog struct {
	mu    sync.Mutex
	dir   string
	files map[string]*os.File
}

// NewReadLog returns a ReadLog writing <dir>/<RecordFileName(ref)>.
func NewReadLog(dir string) (*ReadLog, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating read log directory: %w", err)
	}
	return &ReadLog{dir: dir, files: map[string]*os.File{}}, nil
}

// RecordFileName returns the name of the file a ReadLog writes for ref:
// the reference with characters other than letters, digits, '.', '-' and
// '_' replaced by '_', plus ".txt".
func RecordFileName(ref string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '-', r == '_':
			return r
		}
		return '_'
	}, ref) + ".txt"
}

// FirstRead implements ImageRecorder.
func (l *ReadLog) FirstRead(ref string, layer digest.Digest, name string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f, ok := l.files[ref]
	if !ok {
		var err error
		f, err = os.OpenFile(filepath.Join(l.dir, RecordFileName(ref)), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return
		}
		l.files[ref] = f
	}
	_, _ = f.WriteString(name + "\n")
}

// Close closes the files.
func (l *ReadLog) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var err error
	for ref, f := range l.files {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		delete(l.files, ref)
	}
	return err
}
