package testenv

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// DefaultModTime is the mtime of every entry a Layer builds unless ModTime
// says otherwise: fixed, so the same layer always has the same digest.
var DefaultModTime = time.Date(2021, 2, 3, 4, 5, 6, 0, time.UTC)

// Whiteout markers of the OCI image layer format.
const (
	WhiteoutPrefix = ".wh."
	OpaqueWhiteout = ".wh..wh..opq"
)

// Entry is one tar entry of a Layer.
type Entry struct {
	Header tar.Header
	Data   []byte
}

// Layer builds an image layer tar, entry by entry, in order:
//
//	l := testenv.NewLayer().
//		Dir("etc", testenv.Mode(0o750)).
//		File("etc/motd", "hi\n", testenv.Xattr("user.foo", "bar")).
//		Hardlink("etc/motd.link", "etc/motd").
//		Symlink("etc/link", "motd").
//		Whiteout("etc/old").
//		Opaque("var")
//
// Missing parent directories are added before their first child (mode
// 0755, owner 0:0, DefaultModTime), in every layer, so what a layer sets is
// all there is to know about the merged view. Names are relative ("etc/motd").
// A builder method that fails records the error; Tar and Err report it.
type Layer struct {
	entries []Entry
	index   map[string]int // clean name -> index of its last entry
	err     error
}

// NewLayer returns an empty layer.
func NewLayer() *Layer { return &Layer{index: map[string]int{}} }

// EntryOpt sets attributes of a Layer entry.
type EntryOpt func(*tar.Header)

// Mode sets the permission bits, including setuid, setgid and sticky (0o4755).
func Mode(perm int64) EntryOpt { return func(h *tar.Header) { h.Mode = perm & 0o7777 } }

// Owner sets the numeric owner.
func Owner(uid, gid int) EntryOpt { return func(h *tar.Header) { h.Uid, h.Gid = uid, gid } }

// ModTime sets the mtime.
func ModTime(t time.Time) EntryOpt { return func(h *tar.Header) { h.ModTime = t } }

// Xattr adds an extended attribute as a PAX SCHILY.xattr record. Linux
// keeps user.* attributes on regular files and directories only.
func Xattr(name, value string) EntryOpt {
	return func(h *tar.Header) {
		if h.PAXRecords == nil {
			h.PAXRecords = map[string]string{}
		}
		h.PAXRecords["SCHILY.xattr."+name] = value
	}
}

func cleanName(name string) string {
	name = path.Clean("/" + name)
	return strings.TrimPrefix(name, "/")
}

func (l *Layer) fail(format string, args ...any) *Layer {
	if l.err == nil {
		l.err = fmt.Errorf(format, args...)
	}
	return l
}

// add appends an entry, after the missing parents of name.
func (l *Layer) add(name string, h tar.Header, data []byte, opts ...EntryOpt) *Layer {
	name = cleanName(name)
	if name == "" {
		return l.fail("layer entry with empty name")
	}
	l.addParents(name)
	h.Name = name
	if h.Typeflag == tar.TypeDir {
		h.Name += "/"
	}
	if h.ModTime.IsZero() {
		h.ModTime = DefaultModTime
	}
	for _, o := range opts {
		o(&h)
	}
	if h.Typeflag == tar.TypeReg {
		h.Size = int64(len(data))
	}
	l.index[name] = len(l.entries)
	l.entries = append(l.entries, Entry{Header: h, Data: data})
	return l
}

func (l *Layer) addParents(name string) {
	dir := path.Dir(name)
	if dir == "." {
		return
	}
	if _, ok := l.index[dir]; ok {
		return
	}
	l.addParents(dir)
	l.index[dir] = len(l.entries)
	l.entries = append(l.entries, Entry{Header: tar.Header{
		Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755, ModTime: DefaultModTime,
	}})
}

// Dir adds a directory (default mode 0755).
func (l *Layer) Dir(name string, opts ...EntryOpt) *Layer {
	return l.add(name, tar.Header{Typeflag: tar.TypeDir, Mode: 0o755}, nil, opts...)
}

// File adds a regular file (default mode 0644).
func (l *Layer) File(name, content string, opts ...EntryOpt) *Layer {
	return l.FileBytes(name, []byte(content), opts...)
}

// FileBytes adds a regular file (default mode 0644).
func (l *Layer) FileBytes(name string, content []byte, opts ...EntryOpt) *Layer {
	return l.add(name, tar.Header{Typeflag: tar.TypeReg, Mode: 0o644}, content, opts...)
}

// Symlink adds a symbolic link to target.
func (l *Layer) Symlink(name, target string, opts ...EntryOpt) *Layer {
	return l.add(name, tar.Header{Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777}, nil, opts...)
}

// Hardlink adds a hard link to target, a regular file added earlier to this
// layer (the layer format allows no other). The entry repeats the target's
// attributes, as tar does: both names are one inode.
func (l *Layer) Hardlink(name, target string) *Layer {
	target = cleanName(target)
	i, ok := l.index[target]
	if !ok || l.entries[i].Header.Typeflag != tar.TypeReg {
		return l.fail("hardlink %s: target %s is not a regular file of this layer", name, target)
	}
	t := l.entries[i].Header
	h := tar.Header{
		Typeflag: tar.TypeLink, Linkname: target, Mode: t.Mode, Uid: t.Uid, Gid: t.Gid,
		ModTime: t.ModTime,
	}
	if len(t.PAXRecords) > 0 {
		h.PAXRecords = map[string]string{}
		for k, v := range t.PAXRecords {
			h.PAXRecords[k] = v
		}
	}
	return l.add(name, h, nil)
}

// CharDevice adds a character device (default mode 0666).
func (l *Layer) CharDevice(name string, major, minor int64, opts ...EntryOpt) *Layer {
	return l.add(name, tar.Header{Typeflag: tar.TypeChar, Devmajor: major, Devminor: minor, Mode: 0o666}, nil, opts...)
}

// BlockDevice adds a block device (default mode 0660).
func (l *Layer) BlockDevice(name string, major, minor int64, opts ...EntryOpt) *Layer {
	return l.add(name, tar.Header{Typeflag: tar.TypeBlock, Devmajor: major, Devminor: minor, Mode: 0o660}, nil, opts...)
}

// Fifo adds a named pipe (default mode 0644).
func (l *Layer) Fifo(name string, opts ...EntryOpt) *Layer {
	return l.add(name, tar.Header{Typeflag: tar.TypeFifo, Mode: 0o644}, nil, opts...)
}

// Whiteout deletes name, and everything under it, of the layers below.
func (l *Layer) Whiteout(name string) *Layer {
	name = cleanName(name)
	return l.add(path.Join(path.Dir(name), WhiteoutPrefix+path.Base(name)),
		tar.Header{Typeflag: tar.TypeReg, Mode: 0o644}, nil)
}

// Opaque hides what the layers below have in dir; entries this layer adds
// to dir stay.
func (l *Layer) Opaque(dir string) *Layer {
	return l.add(path.Join(cleanName(dir), OpaqueWhiteout), tar.Header{Typeflag: tar.TypeReg, Mode: 0o644}, nil)
}

// Raw appends an entry verbatim: no parents added, no defaults.
func (l *Layer) Raw(h tar.Header, data []byte) *Layer {
	l.index[cleanName(h.Name)] = len(l.entries)
	l.entries = append(l.entries, Entry{Header: h, Data: data})
	return l
}

// Entries returns the entries in tar order.
func (l *Layer) Entries() []Entry { return append([]Entry(nil), l.entries...) }

// Err is the first error a builder method met.
func (l *Layer) Err() error { return l.err }

// Tar returns the layer as an uncompressed tar stream.
func (l *Layer) Tar() ([]byte, error) {
	if l.err != nil {
		return nil, l.err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range l.entries {
		h := e.Header
		if len(h.PAXRecords) > 0 {
			h.Format = tar.FormatPAX
		}
		if err := tw.WriteHeader(&h); err != nil {
			return nil, fmt.Errorf("tar header %s: %w", h.Name, err)
		}
		if len(e.Data) > 0 {
			if _, err := tw.Write(e.Data); err != nil {
				return nil, fmt.Errorf("tar data %s: %w", h.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// LayerBlob is a layer as a registry stores it.
type LayerBlob struct {
	MediaType   string
	Data        []byte            // the blob
	DiffID      digest.Digest     // sha256 of the uncompressed stream
	Annotations map[string]string // copied to the manifest's layer descriptor
	// Uncompressed is the blob's uncompressed tar stream: what an unpacking
	// snapshotter applies and ExpectedTree reads.
	Uncompressed []byte
}

// Digest is the blob's digest.
func (b LayerBlob) Digest() digest.Digest { return digest.FromBytes(b.Data) }

// Descriptor is the blob's descriptor in a manifest.
func (b LayerBlob) Descriptor() ocispec.Descriptor {
	return ocispec.Descriptor{
		MediaType:   b.MediaType,
		Digest:      b.Digest(),
		Size:        int64(len(b.Data)),
		Annotations: b.Annotations,
	}
}

// NewLayerBlob wraps an already encoded blob (an eStargz layer, say) and
// its uncompressed stream.
func NewLayerBlob(mediaType string, data, uncompressed []byte, annotations map[string]string) LayerBlob {
	return LayerBlob{
		MediaType:    mediaType,
		Data:         data,
		DiffID:       digest.FromBytes(uncompressed),
		Annotations:  annotations,
		Uncompressed: uncompressed,
	}
}

// GzipLayer encodes l as an application/vnd.oci.image.layer.v1.tar+gzip blob.
func GzipLayer(l *Layer) (LayerBlob, error) {
	t, err := l.Tar()
	if err != nil {
		return LayerBlob{}, err
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(t); err != nil {
		return LayerBlob{}, err
	}
	if err := zw.Close(); err != nil {
		return LayerBlob{}, err
	}
	return NewLayerBlob(ocispec.MediaTypeImageLayerGzip, buf.Bytes(), t, nil), nil
}

// TarLayer encodes l as an uncompressed application/vnd.oci.image.layer.v1.tar blob.
func TarLayer(l *Layer) (LayerBlob, error) {
	t, err := l.Tar()
	if err != nil {
		return LayerBlob{}, err
	}
	return NewLayerBlob(ocispec.MediaTypeImageLayer, t, t, nil), nil
}
