package fs

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

type mapStore struct {
	mu sync.Mutex
	m  map[digest.Digest][]byte
}

func (s *mapStore) Add(d digest.Digest, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.m[d] = append([]byte(nil), data...)
	return nil
}
func (s *mapStore) ReadAt(d digest.Digest, p []byte, off int64) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.m[d]
	if !ok {
		return 0, os.ErrNotExist
	}
	return copy(p, b[off:]), nil
}
func (s *mapStore) Has(d digest.Digest) bool { s.mu.Lock(); defer s.mu.Unlock(); _, ok := s.m[d]; return ok }

type bytesBlob []byte

func (b bytesBlob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	return bytes.NewReader(b).ReadAt(p, off)
}

func TestQuickMount(t *testing.T) {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	mt := time.Unix(1700000000, 0)
	tw.WriteHeader(&tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0755, ModTime: mt})
	big := bytes.Repeat([]byte("0123456789abcdef"), 100000)
	tw.WriteHeader(&tar.Header{Name: "etc/big", Typeflag: tar.TypeReg, Mode: 0644, Size: int64(len(big)), ModTime: mt, PAXRecords: map[string]string{"SCHILY.xattr.user.foo": "bar"}})
	tw.Write(big)
	tw.WriteHeader(&tar.Header{Name: "etc/.wh.gone", Typeflag: tar.TypeReg, Mode: 0644, ModTime: mt})
	tw.WriteHeader(&tar.Header{Name: "opq/.wh..wh..opq", Typeflag: tar.TypeReg, Mode: 0644, ModTime: mt})
	tw.WriteHeader(&tar.Header{Name: "etc/link", Typeflag: tar.TypeLink, Linkname: "etc/big", ModTime: mt})
	tw.Close()
	var out bytes.Buffer
	res, err := estargz.Build(context.Background(), &out, &tb, estargz.BuildOptions{ChunkSize: 300000})
	if err != nil {
		t.Fatal(err)
	}
	r, err := estargz.Open(bytes.NewReader(out.Bytes()), int64(out.Len()), estargz.OpenOptions{TOCDigest: res.TOCDigest})
	if err != nil {
		t.Fatal(err)
	}
	l := NewLayer(res.Digest, r.Index, r.Footer.Compression, func(ctx context.Context) (Blob, error) { return bytesBlob(out.Bytes()), nil }, &mapStore{m: map[digest.Digest][]byte{}}, LayerOptions{})
	dir := t.TempDir()
	m, err := MountLayer(dir, l, MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Unmount()
	got, err := os.ReadFile(filepath.Join(dir, "etc/big"))
	if err != nil || !bytes.Equal(got, big) {
		t.Fatalf("read: %v", err)
	}
	fi, err := os.Lstat(filepath.Join(dir, "etc/gone"))
	t.Logf("whiteout: %v %v", fi.Mode(), err)
	st, _ := os.Stat(filepath.Join(dir, "etc/link"))
	t.Logf("link %v %+v", st.Mode(), st.Sys())
	t.Logf("stats %+v", l.Stats())
}
