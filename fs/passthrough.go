// Passthrough assembly: giving the kernel a file on disk that holds exactly
// a file's content, so that its reads bypass the daemon (FUSE passthrough).
//
// A single-chunk file's backing file is its chunk's cache entry, which
// holds the very bytes a FUSE read would serve (verified against the same
// chunk digest). A file of several chunks gets a cache entry of its own,
// keyed by the file's digest. That digest is the TOC's word, which no chunk
// read checks: an entry merely found under it may hold another file's
// content (a hostile TOC can declare any digest, and the cache may hold an
// entry under it from another image). So a layer uses such an entry only
// once it has proven, for that file, that the file's verified chunks are
// its content: streaming the chunks into a new entry checks that they hash
// to the digest, and an entry that was there already is compared with the
// chunks byte for byte (and the chunks hashed) before it is used. A file
// that fails the proof is never given a backing file and is read through
// FUSE, from its chunks. Nothing here fetches: a file not fully cached is
// read through FUSE as usual.

package fs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

// maxSyncAssemble bounds the files that are assembled from their chunks
// while the open that wants them waits; larger ones are assembled in the
// background for the opens that follow.
const maxSyncAssemble = 64 << 20

// passthroughState is a layer's record of its multi-chunk files' whole-file
// entries.
type passthroughState struct {
	busy   sync.Map // file digest -> struct{}, while assembled or checked
	proven sync.Map // *estargz.Node -> bool: its chunks are (true) or are not (false) the content of its digest's entry
}

// backingFile returns a file holding exactly n's content, for passthrough,
// or nil. A single-chunk file is its chunk's cache entry. A larger file is
// a cache entry of its own, keyed by the file's digest, used once this
// layer has proven that it holds the file's verified chunks (see above).
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
	if v, ok := l.pt.proven.Load(n); ok {
		if !v.(bool) {
			return nil
		}
		// Entries are added only from verified streams (or, after a
		// restart, hashed on first use), so an entry under the digest
		// now holds the proven content.
		if f, err := ps.OpenFile(n.Digest); err == nil {
			return f
		}
		// Evicted: assemble it again.
	}
	for _, c := range n.Chunks {
		if !l.store.Has(c.Digest) {
			return nil
		}
	}
	if _, busy := l.pt.busy.LoadOrStore(n.Digest, struct{}{}); busy {
		return nil
	}
	prove := func() {
		defer l.pt.busy.Delete(n.Digest)
		ok, err := l.proveWholeFile(ps, n)
		if err != nil {
			log.G(ctx).WithError(err).WithFields(log.Fields{"layer": l.digest, "file": n.Name}).Debug("assembling a file for passthrough failed")
			return
		}
		if !ok {
			log.G(ctx).WithFields(log.Fields{"layer": l.digest, "file": n.Name, "digest": n.Digest}).
				Warn("a file's cache entry under its TOC digest does not hold its verified chunks; reading it through FUSE")
		}
		l.pt.proven.Store(n, ok)
	}
	if n.Size > maxSyncAssemble {
		go prove()
		return nil
	}
	prove()
	if v, _ := l.pt.proven.Load(n); v != true {
		return nil
	}
	f, err := ps.OpenFile(n.Digest)
	if err != nil {
		return nil
	}
	return f
}

// proveWholeFile makes sure that the store's entry under n's digest holds
// n's verified chunks, assembling it from them if it is missing. It
// returns false if the chunks do not hash to the digest the TOC declares,
// or the entry found there holds other bytes; an error if the chunks or
// the entry could not be read.
func (l *Layer) proveWholeFile(ps PassthroughStore, n *estargz.Node) (bool, error) {
	hr := &hashingReader{r: &chunkReader{l: l, n: n}, h: n.Digest.Algorithm().Hash()}
	err := ps.AddFrom(n.Digest, n.Size, hr)
	if hr.n == n.Size {
		// AddFrom consumed the stream: it stored it only if it hashed
		// to the digest.
		if got := digest.NewDigest(n.Digest.Algorithm(), hr.h); got != n.Digest {
			return false, nil
		}
		return err == nil, err
	}
	if err != nil {
		return false, err
	}
	// An entry was there already: do not trust it, compare it.
	f, err := ps.OpenFile(n.Digest)
	if err != nil {
		return false, err
	}
	defer f.Close()
	hr = &hashingReader{r: &chunkReader{l: l, n: n}, h: n.Digest.Algorithm().Hash()}
	same, err := sameContent(io.NewSectionReader(f, 0, n.Size+1), hr)
	if err != nil {
		return false, err
	}
	return same && hr.n == n.Size && digest.NewDigest(n.Digest.Algorithm(), hr.h) == n.Digest, nil
}

// sameContent reports whether a and b yield the same bytes.
func sameContent(a, b io.Reader) (bool, error) {
	const bufSize = 256 << 10
	ba, bb := make([]byte, bufSize), make([]byte, bufSize)
	for {
		na, ea := io.ReadFull(a, ba)
		nb, eb := io.ReadFull(b, bb)
		if ea != nil && !errors.Is(ea, io.EOF) && !errors.Is(ea, io.ErrUnexpectedEOF) {
			return false, fmt.Errorf("reading the whole-file entry: %w", ea)
		}
		if eb != nil && !errors.Is(eb, io.EOF) && !errors.Is(eb, io.ErrUnexpectedEOF) {
			return false, fmt.Errorf("reading the file's chunks: %w", eb)
		}
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			return false, nil
		}
		if ea != nil || eb != nil {
			return ea != nil && eb != nil, nil
		}
	}
}

// hashingReader hashes and counts what is read through it.
type hashingReader struct {
	r io.Reader
	h hash.Hash
	n int64
}

func (r *hashingReader) Read(p []byte) (int, error) {
	k, err := r.r.Read(p)
	r.h.Write(p[:k])
	r.n += int64(k)
	return k, err
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
