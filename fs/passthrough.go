// Passthrough assembly: giving the kernel a file on disk that holds exactly
// a file's content, so that its reads bypass the daemon (FUSE passthrough).
//
// A single-chunk file's backing file is its chunk's cache entry. A file of
// several chunks gets a cache entry of its own, keyed by the file's digest,
// written from its cached chunks (and verified again as it is written) once
// they are all there. Nothing here fetches: a file not fully cached is read
// through FUSE as usual.

package fs

import (
	"context"
	"io"
	"os"

	"github.com/containerd/log"

	"github.com/lazypull/lazypull/estargz"
)

// maxSyncAssemble bounds the files that are assembled from their chunks
// while the open that wants them waits; larger ones are assembled in the
// background for the opens that follow.
const maxSyncAssemble = 64 << 20

// backingFile returns a file holding exactly n's content, for passthrough,
// or nil. A single-chunk file is its chunk's cache entry. A larger file is
// a cache entry of its own, keyed by the file's digest and assembled from
// its chunks once they are all cached (verified again as it is written).
func (l *Layer) backingFile(ctx context.Context, n *estargz.Node) *os.File {
	ps, ok := l.store.(PassthroughStore)
	if !ok || len(n.Chunks) == 0 {
		return nil
	}
	if len(n.Chunks) == 1 {
		if n.Chunks[0].Size != n.Size {
			return nil
		}
		f, err := ps.OpenFile(n.Chunks[0].Digest)
		if err != nil {
			return nil
		}
		return f
	}
	if n.Digest == "" {
		return nil
	}
	if f, err := ps.OpenFile(n.Digest); err == nil {
		return f
	}
	for _, c := range n.Chunks {
		if !l.store.Has(c.Digest) {
			return nil
		}
	}
	if _, busy := l.assembling.LoadOrStore(n.Digest, struct{}{}); busy {
		return nil
	}
	assemble := func() {
		defer l.assembling.Delete(n.Digest)
		if err := ps.AddFrom(n.Digest, n.Size, &chunkReader{l: l, n: n}); err != nil {
			log.G(ctx).WithError(err).WithField("file", n.Name).Debug("assembling a file for passthrough failed")
		}
	}
	if n.Size > maxSyncAssemble {
		go assemble()
		return nil
	}
	assemble()
	f, err := ps.OpenFile(n.Digest)
	if err != nil {
		return nil
	}
	return f
}

// chunkReader streams a file's content from the store.
type chunkReader struct {
	l   *Layer
	n   *estargz.Node
	i   int   // current chunk
	off int64 // offset in it
}

func (r *chunkReader) Read(p []byte) (int, error) {
	for r.i < len(r.n.Chunks) {
		c := r.n.Chunks[r.i]
		if r.off >= c.Size {
			r.i, r.off = r.i+1, 0
			continue
		}
		want := min(int64(len(p)), c.Size-r.off)
		k, err := r.l.store.ReadAt(c.Digest, p[:want], r.off)
		r.off += int64(k)
		if k > 0 {
			return k, nil
		}
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return 0, err
	}
	return 0, io.EOF
}
