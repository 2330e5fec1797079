// Package fstest helps test lazily mounted layers against what their layer
// tars say: it builds layer tars with every kind of entry (Entry, Tar,
// RichLayer), computes the tree a layer mount must show (LayerView) and the
// tree an overlayfs stack of layers must show (Merged), walks a mounted
// tree into the same form (Walk), and lists the differences (Compare).
//
// It knows nothing about package fs, so that tests of fs (internal or
// external) can use it.
package fstest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"math/rand"
	"testing"
	"time"
)

// Entry is one tar entry: a header and, for regular files, its content.
type Entry struct {
	Header tar.Header
	Data   []byte
}

// Epoch is the default modification time of entries made here.
var Epoch = time.Date(2023, 11, 14, 22, 13, 20, 0, time.UTC)

func entry(typ byte, name string, mode int64) Entry {
	return Entry{Header: tar.Header{
		Typeflag: typ, Name: name, Mode: mode, ModTime: Epoch, Format: tar.FormatPAX,
		Uname: "root", Gname: "root",
	}}
}

// Dir is a directory entry (name may end in "/").
func Dir(name string, mode int64) Entry { return entry(tar.TypeDir, name, mode) }

// Reg is a regular file with content data.
func Reg(name string, mode int64, data []byte) Entry {
	e := entry(tar.TypeReg, name, mode)
	e.Header.Size = int64(len(data))
	e.Data = data
	return e
}

// Symlink is a symbolic link to target.
func Symlink(name, target string) Entry {
	e := entry(tar.TypeSymlink, name, 0o777)
	e.Header.Linkname = target
	return e
}

// Hardlink is a hard link to the entry named target.
func Hardlink(name, target string) Entry {
	e := entry(tar.TypeLink, name, 0)
	e.Header.Linkname = target
	return e
}

// Char is a character device.
func Char(name string, mode int64, major, minor int64) Entry {
	e := entry(tar.TypeChar, name, mode)
	e.Header.Devmajor, e.Header.Devminor = major, minor
	return e
}

// Block is a block device.
func Block(name string, mode int64, major, minor int64) Entry {
	e := entry(tar.TypeBlock, name, mode)
	e.Header.Devmajor, e.Header.Devminor = major, minor
	return e
}

// Fifo is a named pipe.
func Fifo(name string, mode int64) Entry { return entry(tar.TypeFifo, name, mode) }

// Whiteout is the overlay whiteout ".wh.BASE" deleting dir/base of lower
// layers (dir "" is the root).
func Whiteout(dir, base string) Entry {
	return Reg(join(dir, ".wh."+base), 0o644, nil)
}

// Opaque is the ".wh..wh..opq" marker making dir opaque.
func Opaque(dir string) Entry { return Reg(join(dir, ".wh..wh..opq"), 0o644, nil) }

func join(dir, base string) string {
	if dir == "" {
		return base
	}
	return dir + "/" + base
}

// Own sets the owner.
func (e Entry) Own(uid, gid int) Entry {
	e.Header.Uid, e.Header.Gid = uid, gid
	e.Header.Uname, e.Header.Gname = "", ""
	return e
}

// At sets the modification time.
func (e Entry) At(t time.Time) Entry {
	e.Header.ModTime = t
	return e
}

// X adds an extended attribute.
func (e Entry) X(name, value string) Entry {
	m := make(map[string]string, len(e.Header.PAXRecords)+1)
	for k, v := range e.Header.PAXRecords {
		m[k] = v
	}
	m["SCHILY.xattr."+name] = value
	e.Header.PAXRecords = m
	return e
}

// Tar writes entries as a tar stream (PAX format).
func Tar(t testing.TB, entries []Entry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range entries {
		h := e.Header
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("fstest: tar header %q: %v", h.Name, err)
		}
		if len(e.Data) > 0 {
			if _, err := tw.Write(e.Data); err != nil {
				t.Fatalf("fstest: tar data %q: %v", h.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatalf("fstest: tar: %v", err)
	}
	return b.Bytes()
}

// Gzip compresses p, as an ordinary (not eStargz) layer blob.
func Gzip(t testing.TB, p []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&b, gzip.BestSpeed)
	if _, err := zw.Write(p); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// Random returns n pseudo-random (incompressible) bytes from seed.
func Random(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// Text returns n bytes of compressible pseudo-text from seed.
func Text(seed int64, n int) []byte {
	words := []string{"lorem ", "ipsum ", "dolor ", "sit ", "amet ", "layer ", "chunk ", "lazy\n", "pull ", "fuse "}
	r := rand.New(rand.NewSource(seed))
	b := make([]byte, 0, n+8)
	for len(b) < n {
		b = append(b, words[r.Intn(len(words))]...)
	}
	return b[:n]
}
