package fs

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/cache"
	"github.com/lazypull/lazypull/estargz"
)

func TestVerifyErrorClasses(t *testing.T) {
	if !errors.Is(ErrVerify, errdefs.ErrDataLoss) || !errdefs.IsDataLoss(ErrVerify) {
		t.Error("ErrVerify is not classed as data loss")
	}
	if !errdefs.IsDataLoss(&estargz.Error{Kind: estargz.ErrDigest, Offset: -1}) {
		t.Error("an estargz digest mismatch is not classed as data loss")
	}
	if errdefs.IsDataLoss(&estargz.Error{Kind: estargz.ErrFormat, Offset: -1}) {
		t.Error("a malformed blob is classed as data loss by estargz")
	}
}

// A chunk whose bytes were altered fails a read (no FUSE) with an error
// that is ErrVerify, data loss, and says what estargz found; it is counted
// and not cached.
func TestAlteredChunkError(t *testing.T) {
	data := bytes.Repeat([]byte("lazypull "), 20000)
	blob, r := buildLayer(t, []tarFile{{"a/f", data}}, 64<<10)
	n, _ := r.Index.Lookup("a/f")
	bad := n.Chunks[1]
	altered := bytes.Clone(blob)
	// Alter a byte of the compressed member's stored data (the deflate
	// payload, past the gzip header) so that decoding or the digest fails.
	altered[bad.Offset+(bad.End-bad.Offset)/2] ^= 0x55
	store, err := cache.Open(cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	l := NewLayer(digest.FromBytes(altered), r.Index, r.Footer.Compression,
		func(context.Context) (Blob, error) { return fileBlob{bytes.NewReader(altered)}, nil }, store, LayerOptions{ReadAhead: -1})
	defer l.Close()

	buf := make([]byte, 100)
	if _, err := l.ReadAt(context.Background(), n, buf, 0); err != nil || !bytes.Equal(buf, data[:100]) {
		t.Fatalf("reading the good first chunk: %v", err)
	}
	_, err = l.ReadAt(context.Background(), n, buf, bad.FileOffset)
	if !errors.Is(err, ErrVerify) || !errdefs.IsDataLoss(err) {
		t.Fatalf("reading the altered chunk: %v, want ErrVerify (data loss)", err)
	}
	var ee *estargz.Error
	if !errors.As(err, &ee) {
		t.Errorf("the error does not carry what estargz found: %v", err)
	}
	if store.Has(bad.Digest) {
		t.Error("the altered chunk was cached")
	}
	if st := l.Stats(); st.VerifyFailures != 1 {
		t.Errorf("VerifyFailures = %d, want 1", st.VerifyFailures)
	}
}
