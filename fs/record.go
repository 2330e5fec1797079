package fs

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

// ReadLog records what an image's workload reads, in files under a
// directory, as it happens (unbuffered, so the log can be read while the
// image runs):
//
//   - <RecordFileName(ref)>: the paths of the files read, one per line, in
//     the order they counted as read (see Recorder.FirstRead). This is the
//     file `lazypull convert --prioritize` takes.
//   - <RecordFileName(ref)>.chunks: "<layer digest> <offset> <end>" per
//     chunk read, the compressed extent of the chunk in the layer blob —
//     what the workload really needed from the registry.
type ReadLog struct {
	mu    sync.Mutex
	dir   string
	files map[string]*os.File
}

// NewReadLog returns a ReadLog writing into dir.
func NewReadLog(dir string) (*ReadLog, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating read log directory: %w", err)
	}
	return &ReadLog{dir: dir, files: map[string]*os.File{}}, nil
}

// RecordFileName returns the name of the file list a ReadLog writes for
// ref: the reference with characters other than letters, digits, '.', '-'
// and '_' replaced by '_', plus ".txt".
func RecordFileName(ref string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '-', r == '_':
			return r
		}
		return '_'
	}, ref) + ".txt"
}

func (l *ReadLog) write(name, line string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f, ok := l.files[name]
	if !ok {
		var err error
		f, err = os.OpenFile(filepath.Join(l.dir, name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return
		}
		l.files[name] = f
	}
	_, _ = f.WriteString(line)
}

// FirstRead implements ImageRecorder. Paths with a newline cannot be
// written one per line and are left out.
func (l *ReadLog) FirstRead(ref string, layer digest.Digest, name string) {
	if strings.ContainsAny(name, "\n\r") {
		return
	}
	l.write(RecordFileName(ref), name+"\n")
}

// ChunkRead implements ImageRecorder.
func (l *ReadLog) ChunkRead(ref string, layer digest.Digest, c estargz.Chunk) {
	l.write(RecordFileName(ref)+".chunks", fmt.Sprintf("%s %d %d\n", layer, c.Offset, c.End))
}

// Close closes the files.
func (l *ReadLog) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var err error
	for name, f := range l.files {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		delete(l.files, name)
	}
	return err
}

// Recorder learns what a workload reads from a layer.
type Recorder interface {
	// FirstRead is called once per file, when the file counts as read:
	// at its first read if it is small (RecordSmallFile), else once a
	// quarter of it has been read — a program that maps a large library
	// but touches a few pages of it should not make the whole library
	// part of the start-up set.
	FirstRead(layer digest.Digest, name string)
	// ChunkRead is called once per chunk, at its first read.
	ChunkRead(layer digest.Digest, c estargz.Chunk)
}

// RecordSmallFile is the size up to which a file counts as read at its
// first read.
const RecordSmallFile = 1 << 20

// noteRead tells the Recorder that k more bytes of n were read.
func (l *Layer) noteRead(n *estargz.Node, k int64) {
	r := l.opts.Recorder
	if r == nil {
		return
	}
	// Load first: recording is on by default, and LoadOrStore would
	// allocate a counter on every read.
	v, ok := l.readSeen.Load(n)
	if !ok {
		v, _ = l.readSeen.LoadOrStore(n, new(atomic.Int64))
	}
	got := v.(*atomic.Int64)
	if got.Load() < 0 {
		return // recorded already
	}
	sum := got.Add(k)
	if (n.Size <= RecordSmallFile || 4*sum >= n.Size) && got.CompareAndSwap(sum, -1) {
		r.FirstRead(l.digest, n.Name)
	}
}

// noteChunk tells the Recorder about the first read of chunk c.
func (l *Layer) noteChunk(c estargz.Chunk) {
	if r := l.opts.Recorder; r != nil {
		if _, seen := l.chunkSeen.LoadOrStore(c.Digest, struct{}{}); !seen {
			r.ChunkRead(l.digest, c)
		}
	}
}

// notePassthroughOpen tells the Recorder about a file opened for kernel
// passthrough: its reads never reach the daemon, so the open stands for
// them. A small file (RecordSmallFile) counts as read whole; of a larger
// one only the first chunk is noted, since a program may map a large
// library and touch a few pages of it.
func (l *Layer) notePassthroughOpen(n *estargz.Node) {
	if l.opts.Recorder == nil || len(n.Chunks) == 0 {
		return
	}
	cs := n.Chunks
	if n.Size > RecordSmallFile {
		cs = cs[:1]
	}
	for _, c := range cs {
		l.noteChunk(c)
	}
	l.noteRead(n, min(n.Size, RecordSmallFile))
}
