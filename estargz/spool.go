// Spooling: to reorder a layer (prioritized files first), Build copies
// every payload of the input to a temporary file and keeps the headers,
// then writes the entries in the new order from there.

package estargz

import (
	"archive/tar"
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
)

// spooled input for reordering.
type spooledEntry struct {
	h    *tar.Header
	name string
	off  int64 // payload offset in the spool file
}

type spoolFile struct {
	f       *os.File
	entries []*spooledEntry
}

func (s *spoolFile) Close() error {
	name := s.f.Name()
	err := s.f.Close()
	if rerr := os.Remove(name); err == nil && rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = rerr
	}
	return err
}

// spool copies every payload of the input tar to a temporary file and
// keeps the headers, dropping entries that later ones replace.
func spool(ctx context.Context, r io.Reader, dir string) (*spoolFile, error) {
	f, err := os.CreateTemp(dir, "lazypull-spool-*")
	if err != nil {
		return nil, fmt.Errorf("estargz: creating spool file: %w", err)
	}
	sp := &spoolFile{f: f}
	ok := false
	defer func() {
		if !ok {
			sp.Close()
		}
	}()
	w := bufio.NewWriterSize(f, 1<<20)
	var off int64
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("estargz: reading input tar: %w", err)
		}
		if skipInputEntry(h) {
			continue
		}
		name, err := CleanName(h.Name)
		if err != nil {
			return nil, err
		}
		e := &spooledEntry{h: h, name: name, off: off}
		n, err := io.Copy(w, &ctxReader{ctx: ctx, r: tr})
		if err != nil {
			return nil, fmt.Errorf("estargz: entry %q: spooling payload: %w", h.Name, err)
		}
		off += n
		sp.entries = append(sp.entries, e)
	}
	if err := w.Flush(); err != nil {
		return nil, fmt.Errorf("estargz: writing spool file: %w", err)
	}
	names := make([]string, len(sp.entries))
	isDir := make([]bool, len(sp.entries))
	for i, e := range sp.entries {
		names[i], isDir[i] = e.name, e.h.Typeflag == tar.TypeDir
	}
	keep := survivors(names, isDir, nil)
	kept := sp.entries[:0]
	for i, e := range sp.entries {
		if keep[i] {
			kept = append(kept, e)
		}
	}
	sp.entries = kept
	ok = true
	return sp, nil
}

// ctxReader fails reads once ctx is done, so that copying one large
// payload stops promptly on cancellation.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
