package estargz

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// ErrLayerMismatch: a whole blob is not the layer its TOC, its digest or
// its DiffID say it is.
var ErrLayerMismatch = errors.New("layer does not match its TOC or digests")

// LayerDigests are what an image commits to for one layer: the blob's
// digest (the manifest's layer descriptor) and the digest of its
// uncompressed tar stream (the config's DiffID). Empty fields are not
// checked.
type LayerDigests struct {
	Blob   digest.Digest
	DiffID digest.Digest
}

// CheckOptions tune CheckLayer.
type CheckOptions struct {
	// OnChunk, when set, receives the plain bytes of every chunk of a
	// regular file after they matched the chunk's digest, in blob order,
	// so that a caller streaming the blob for the check can also fill a
	// chunk cache. data is only valid during the call. Chunks larger than
	// MaxChunkBuffer are checked but not passed on.
	OnChunk func(c Chunk, data []byte) error
	// MaxChunkBuffer bounds the bytes buffered for OnChunk (default
	// 16 MiB).
	MaxChunkBuffer int64
}

// LayerCheck is the result of a successful CheckLayer.
type LayerCheck struct {
	// BlobDigest and Size are the sha256 and length of the blob read.
	BlobDigest digest.Digest
	Size       int64
	// DiffID is the sha256 of the uncompressed tar stream.
	DiffID digest.Digest
	// Entries is the number of tar entries compared with the TOC.
	Entries int
}

// CheckLayer reads a whole blob from r, in order, and proves that it is
// the layer ix describes and want commits to: the blob's sha256 is
// want.Blob, the uncompressed stream's sha256 is want.DiffID, and the tar
// stream holds exactly the tree the TOC serves. Every tar entry's type,
// mode, owners, size, modification time (to the second), link target,
// device numbers, extended attributes and content (file and chunk
// digests) must match the TOC's node of that name, hardlinks must share
// the node of their target, and every node the TOC serves must come from
// an entry of the tar. Where a name repeats in the tar the last entry is
// the one compared, as when the tar is unpacked. The TOC's own tar entry
// (gzip eStargz) and its skippable frame (zstd:chunked) are the only bytes
// the TOC need not describe.
//
// A difference is an *Error of kind ErrLayerMismatch naming the entry and
// what differs; a blob that cannot be decompressed or parsed is
// ErrFormat. CheckLayer allocates in proportion to the index, not to the
// blob.
func CheckLayer(ctx context.Context, r io.Reader, comp Compression, ix *Index, want LayerDigests, opts CheckOptions) (*LayerCheck, error) {
	if opts.MaxChunkBuffer <= 0 {
		opts.MaxChunkBuffer = 16 << 20
	}
	blobHash := sha256.New()
	var size byteCount
	counted := io.TeeReader(r, io.MultiWriter(blobHash, &size))
	var plain io.Reader
	switch comp {
	case Zstd:
		zr, err := zstd.NewReader(counted, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(1<<30))
		if err != nil {
			return nil, wrapErr(ErrFormat, "", 0, err, "starting zstd decompression")
		}
		defer zr.Close()
		plain = zr
	default:
		gr, err := gzip.NewReader(counted)
		if err != nil {
			return nil, wrapErr(ErrFormat, "", 0, err, "reading the first gzip member")
		}
		defer gr.Close()
		plain = gr
	}
	diffHash := sha256.New()
	c := &layerChecker{
		ix:      ix,
		opts:    opts,
		pending: map[string]string{},
		seen:    make(map[*Node]bool, ix.NumNodes()),
	}
	tr := tar.NewReader(io.TeeReader(plain, diffHash))
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, wrapErr(ErrFormat, "", int64(size), err, "reading the tar stream")
		}
		if err := c.entry(h, tr, comp); err != nil {
			return nil, err
		}
	}
	// The rest of the stream (end-of-archive blocks, padding, the footer)
	// is part of the DiffID and of the blob.
	if _, err := io.Copy(io.Discard, io.TeeReader(plain, diffHash)); err != nil {
		return nil, wrapErr(ErrFormat, "", int64(size), err, "reading the end of the stream")
	}
	if _, err := io.Copy(io.Discard, counted); err != nil {
		return nil, fmt.Errorf("reading the end of the blob: %w", err)
	}
	if err := c.finish(); err != nil {
		return nil, err
	}
	res := &LayerCheck{
		BlobDigest: digest.NewDigest(digest.SHA256, blobHash),
		Size:       int64(size),
		DiffID:     digest.NewDigest(digest.SHA256, diffHash),
		Entries:    c.entries,
	}
	if want.Blob != "" && res.BlobDigest != want.Blob {
		return nil, errorf(ErrLayerMismatch, "", -1, "blob digest is %s, the manifest says %s", res.BlobDigest, want.Blob)
	}
	if want.DiffID != "" && res.DiffID != want.DiffID {
		return nil, errorf(ErrLayerMismatch, "", -1, "uncompressed digest is %s, the image config's DiffID is %s", res.DiffID, want.DiffID)
	}
	return res, nil
}

// layerChecker compares tar entries with an index as they stream by.
type layerChecker struct {
	ix      *Index
	opts    CheckOptions
	entries int
	// pending holds, per name, the difference of the latest tar entry of
	// that name: a later entry of the same name replaces it (the last
	// one wins when unpacking), and any left at the end is a mismatch.
	pending map[string]string
	// seen marks the nodes some tar entry stood for.
	seen   map[*Node]bool
	tocTar bool // the gzip TOC entry went by
	buf    []byte
}

func (c *layerChecker) entry(h *tar.Header, content io.Reader, comp Compression) error {
	c.entries++
	// The tar may not hold more entries than the TOC and its implied
	// directories: that bounds the work and the pending map.
	if c.entries > 2*c.ix.NumNodes()+implicitDirSlack {
		return errorf(ErrLayerMismatch, h.Name, -1, "the tar holds more entries (%d) than the TOC describes", c.entries)
	}
	name, err := CleanName(h.Name)
	if err != nil {
		return wrapErr(ErrLayerMismatch, h.Name, -1, err, "tar entry name")
	}
	if name == TOCTarName && comp != Zstd && !c.tocTar {
		if _, inTOC := c.ix.Lookup(name); !inTOC {
			c.tocTar = true
			return nil
		}
	}
	n, ok := c.ix.Lookup(name)
	if name == "" {
		n, ok = c.ix.Root(), true
	}
	if !ok {
		c.pending[name] = "the tar has it, the TOC does not"
		return drain(content)
	}
	diff, err := c.compare(name, n, h, content)
	if err != nil {
		return err
	}
	if diff != "" {
		c.pending[name] = diff
	} else {
		delete(c.pending, name)
	}
	c.seen[n] = true
	return nil
}

func drain(r io.Reader) error {
	_, err := io.Copy(io.Discard, r)
	return err
}

// compare returns the first difference between a tar entry and the node
// the TOC serves under its name, or "" when they agree.
func (c *layerChecker) compare(name string, n *Node, h *tar.Header, content io.Reader) (string, error) {
	if h.Typeflag == tar.TypeLink {
		target, err := CleanName(h.Linkname)
		if err != nil {
			return fmt.Sprintf("hardlink target %q: %v", h.Linkname, err), drain(content)
		}
		t, ok := c.ix.Lookup(target)
		if !ok || t != n {
			return fmt.Sprintf("hardlink to %q, but the TOC serves another file under this name", target), drain(content)
		}
		return "", drain(content)
	}
	typ, ok := tarType(h.Typeflag)
	if !ok {
		return fmt.Sprintf("tar entry type %q the TOC cannot describe", h.Typeflag), drain(content)
	}
	switch {
	case typ != n.Type:
		return fmt.Sprintf("type %s in the tar, %s in the TOC", typ, n.Type), drain(content)
	case uint32(h.Mode)&07777 != n.Mode:
		return fmt.Sprintf("mode %#o in the tar, %#o in the TOC", h.Mode&07777, n.Mode), drain(content)
	case int64(h.Uid) != int64(n.UID) || int64(h.Gid) != int64(n.GID):
		return fmt.Sprintf("owner %d:%d in the tar, %d:%d in the TOC", h.Uid, h.Gid, n.UID, n.GID), drain(content)
	case h.ModTime.Unix() != n.ModTime.Unix():
		return fmt.Sprintf("mtime %s in the tar, %s in the TOC", h.ModTime.UTC().Format("2006-01-02T15:04:05Z"), n.ModTime.UTC().Format("2006-01-02T15:04:05Z")), drain(content)
	case typ == TypeSymlink && h.Linkname != n.LinkName:
		return fmt.Sprintf("symlink to %q in the tar, to %q in the TOC", h.Linkname, n.LinkName), drain(content)
	case (typ == TypeChar || typ == TypeBlock) && (int64(h.Devmajor) != int64(n.DevMajor) || int64(h.Devminor) != int64(n.DevMinor)):
		return fmt.Sprintf("device %d,%d in the tar, %d,%d in the TOC", h.Devmajor, h.Devminor, n.DevMajor, n.DevMinor), drain(content)
	case typ == TypeReg && h.Size != n.Size:
		return fmt.Sprintf("size %d in the tar, %d in the TOC", h.Size, n.Size), drain(content)
	}
	if x := tarXattrs(h); !maps.EqualFunc(x, n.Xattrs, bytes.Equal) && (len(x) > 0 || len(n.Xattrs) > 0) {
		return fmt.Sprintf("extended attributes %s in the tar, %s in the TOC", xattrNames(x), xattrNames(n.Xattrs)), drain(content)
	}
	if typ != TypeReg {
		return "", drain(content)
	}
	return c.compareContent(name, n, content)
}

// compareContent hashes a regular file's content chunk by chunk.
func (c *layerChecker) compareContent(name string, n *Node, content io.Reader) (string, error) {
	file := sha256.New()
	var off int64
	for _, ch := range n.Chunks {
		if ch.FileOffset != off {
			return fmt.Sprintf("TOC chunks leave a gap at %d", off), drain(content)
		}
		h := sha256.New()
		var w io.Writer = io.MultiWriter(file, h)
		keep := c.opts.OnChunk != nil && ch.Size <= c.opts.MaxChunkBuffer
		if keep {
			c.buf = c.buf[:0]
			w = io.MultiWriter(w, (*appendWriter)(&c.buf))
		}
		got, err := io.CopyN(w, content, ch.Size)
		if err != nil {
			return "", wrapErr(ErrFormat, name, off+got, err, "reading file content")
		}
		if d := digest.NewDigest(digest.SHA256, h); d != ch.Digest {
			return fmt.Sprintf("chunk at %d has digest %s in the tar, %s in the TOC", ch.FileOffset, d, ch.Digest), drain(content)
		}
		if keep {
			if err := c.opts.OnChunk(ch, c.buf); err != nil {
				return "", fmt.Errorf("passing on chunk %s of %s: %w", ch.Digest, name, err)
			}
		}
		off += ch.Size
	}
	if off != n.Size {
		return fmt.Sprintf("TOC chunks cover %d of %d bytes", off, n.Size), drain(content)
	}
	if n.Digest != "" {
		if d := digest.NewDigest(digest.SHA256, file); d != n.Digest {
			return fmt.Sprintf("content digest %s in the tar, %s in the TOC", d, n.Digest), drain(content)
		}
	}
	return "", drain(content)
}

type appendWriter []byte

func (w *appendWriter) Write(p []byte) (int, error) {
	*w = append(*w, p...)
	return len(p), nil
}

// finish reports the first difference left: a tar entry that no later
// entry of the same name corrected, or a node of the TOC no tar entry
// stands for (directories the TOC only implies by its entries' names may
// be missing from the tar too: unpacking creates them alike).
func (c *layerChecker) finish() error {
	if len(c.pending) > 0 {
		names := make([]string, 0, len(c.pending))
		for n := range c.pending {
			names = append(names, n)
		}
		first := slices.Min(names)
		return errorf(ErrLayerMismatch, first, -1, "%s", c.pending[first])
	}
	var missing string
	c.ix.Walk(func(name string, n *Node) bool {
		if missing != "" {
			return false
		}
		if !c.seen[n] && (n.explicit || n.Type != TypeDir) && name != "" {
			missing = name
			return false
		}
		return true
	})
	if missing != "" {
		return errorf(ErrLayerMismatch, missing, -1, "the TOC serves it, the tar does not have it")
	}
	return nil
}

// tarType maps a tar type flag to a TOC entry type.
func tarType(t byte) (string, bool) {
	switch t {
	case tar.TypeReg, tar.TypeRegA:
		return TypeReg, true
	case tar.TypeDir:
		return TypeDir, true
	case tar.TypeSymlink:
		return TypeSymlink, true
	case tar.TypeChar:
		return TypeChar, true
	case tar.TypeBlock:
		return TypeBlock, true
	case tar.TypeFifo:
		return TypeFifo, true
	}
	return "", false
}

const paxXattrPrefix = "SCHILY.xattr."

func tarXattrs(h *tar.Header) map[string][]byte {
	var x map[string][]byte
	for k, v := range h.PAXRecords {
		if name, ok := strings.CutPrefix(k, paxXattrPrefix); ok {
			if x == nil {
				x = map[string][]byte{}
			}
			x[name] = []byte(v)
		}
	}
	return x
}

func xattrNames(x map[string][]byte) string {
	if len(x) == 0 {
		return "none"
	}
	names := make([]string, 0, len(x))
	for k := range x {
		names = append(names, k)
	}
	slices.Sort(names)
	return "[" + strings.Join(names, " ") + "]"
}
