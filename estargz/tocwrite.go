// Writing the TOC: each tar entry that Build writes is recorded as a TOC
// entry (a large file as a reg entry and chunk entries, each with the
// sha256 of its plain bytes); at the end the TOC and the footer that
// locates it are written.

package estargz

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"
)

// writeEntry writes one tar entry and records it in the TOC.
func (b *builder) writeEntry(tw *tar.Writer, h *tar.Header, payload io.Reader, toc *TOC) error {
	name, err := CleanName(h.Name)
	if err != nil {
		return err
	}
	switch h.Typeflag {
	case tar.TypeRegA, tar.TypeGNUSparse, tar.TypeCont:
		h.Typeflag = tar.TypeReg // sparse files arrive expanded
	}
	ent := &TOCEntry{
		Name:        name,
		Mode:        h.Mode,
		UID:         h.Uid,
		GID:         h.Gid,
		Uname:       h.Uname,
		Gname:       h.Gname,
		ModTime3339: formatModTime(h.ModTime),
	}
	if name == "" {
		ent.Name = "./"
	}
	for k, v := range h.PAXRecords {
		if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if ent.Xattrs == nil {
				ent.Xattrs = make(map[string][]byte)
			}
			ent.Xattrs[x] = []byte(v)
		}
	}
	switch h.Typeflag {
	case tar.TypeReg:
		ent.Type, ent.Size = TypeReg, h.Size
	case tar.TypeDir:
		ent.Type = TypeDir
	case tar.TypeSymlink:
		ent.Type, ent.LinkName = TypeSymlink, h.Linkname
	case tar.TypeLink:
		target, err := CleanName(h.Linkname)
		if err != nil {
			return err
		}
		ent.Type, ent.LinkName = TypeHardlink, target
	case tar.TypeChar, tar.TypeBlock:
		ent.Type = TypeChar
		if h.Typeflag == tar.TypeBlock {
			ent.Type = TypeBlock
		}
		ent.DevMajor, ent.DevMinor = int(h.Devmajor), int(h.Devminor)
	case tar.TypeFifo:
		ent.Type = TypeFifo
	default:
		return fmt.Errorf("estargz: entry %q: unsupported tar type %q", h.Name, h.Typeflag)
	}
	if err := writeHeader(tw, h); err != nil {
		return fmt.Errorf("estargz: entry %q: writing tar header: %w", h.Name, err)
	}
	toc.Entries = append(toc.Entries, ent)
	if ent.Type != TypeReg {
		return nil
	}

	cs, payload, err := b.chunkSizeFor(h.Size, payload)
	if err != nil {
		return fmt.Errorf("estargz: entry %q: reading payload: %w", h.Name, err)
	}
	file := digest.SHA256.Digester()
	first := true
	for written := int64(0); written < h.Size; {
		size := min(cs, h.Size-written)
		chunk := ent
		if !first {
			chunk = &TOCEntry{Name: name, Type: TypeChunk}
			toc.Entries = append(toc.Entries, chunk)
		}
		first = false
		chunk.ChunkOffset = written
		if size == cs {
			chunk.ChunkSize = size
		}
		if err := b.startPayload(chunk, size); err != nil {
			return err
		}
		start := len(b.cur.plain)
		if _, err := io.CopyN(tw, payload, size); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("estargz: entry %q: reading payload at %d: %w", h.Name, written, err)
		}
		data := b.cur.plain[start:]
		sum := sha256.Sum256(data)
		chunk.ChunkDigest = digest.NewDigestFromBytes(digest.SHA256, sum[:]).String()
		file.Hash().Write(data)
		b.pinned = false
		written += size
	}
	ent.Digest = file.Digest().String()
	return nil
}

// writeHeader writes h keeping its input format (so PAX sub-second times
// and records survive), falling back to whatever format can hold it.
func writeHeader(tw *tar.Writer, h *tar.Header) error {
	if err := tw.WriteHeader(h); err == nil {
		return nil
	}
	h2 := *h
	h2.Format = tar.FormatPAX
	if err := tw.WriteHeader(&h2); err == nil {
		return nil
	}
	h2.Format = tar.FormatUnknown
	return tw.WriteHeader(&h2)
}

// finish writes the TOC and footer and computes the result.
func (b *builder) finish(toc *TOC) (*BuildResult, error) {
	tocJSON, err := json.MarshalIndent(toc, "", "\t")
	if err != nil {
		return nil, fmt.Errorf("estargz: encoding TOC: %w", err)
	}
	c, err := b.newCompressor()
	if err != nil {
		return nil, err
	}
	tocOff := int64(b.outSize)
	ann := map[string]string{TOCDigestAnnotation: digest.FromBytes(tocJSON).String()}
	switch b.opts.Compression {
	case Zstd:
		compressed, err := c.compress(nil, tocJSON)
		if err != nil {
			return nil, fmt.Errorf("estargz: compressing TOC: %w", err)
		}
		if _, err := b.out.Write(skippableFrame(compressed)); err != nil {
			return nil, fmt.Errorf("estargz: writing TOC: %w", err)
		}
		dataOff := tocOff + skippableHeaderSize
		if _, err := b.out.Write(zstdFooter(dataOff, int64(len(compressed)), int64(len(tocJSON)))); err != nil {
			return nil, fmt.Errorf("estargz: writing footer: %w", err)
		}
		ann[ZstdChunkedManifestChecksumAnnotation] = digest.FromBytes(compressed).String()
		ann[ZstdChunkedManifestPositionAnnotation] = fmt.Sprintf("%d:%d:%d:1", dataOff, len(compressed), len(tocJSON))
	default:
		var plain bytes.Buffer
		tw := tar.NewWriter(&plain)
		if err := tw.WriteHeader(&tar.Header{Name: TOCTarName, Typeflag: tar.TypeReg, Size: int64(len(tocJSON)), Format: tar.FormatUSTAR}); err != nil {
			return nil, fmt.Errorf("estargz: TOC tar header: %w", err)
		}
		if _, err := tw.Write(tocJSON); err != nil {
			return nil, fmt.Errorf("estargz: TOC tar entry: %w", err)
		}
		if err := tw.Close(); err != nil {
			return nil, fmt.Errorf("estargz: TOC tar entry: %w", err)
		}
		compressed, err := c.compress(nil, plain.Bytes())
		if err != nil {
			return nil, fmt.Errorf("estargz: compressing TOC: %w", err)
		}
		b.diff.Hash().Write(plain.Bytes())
		b.plainSize += int64(plain.Len())
		if _, err := b.out.Write(compressed); err != nil {
			return nil, fmt.Errorf("estargz: writing TOC: %w", err)
		}
		if _, err := b.out.Write(gzipFooter(tocOff)); err != nil {
			return nil, fmt.Errorf("estargz: writing footer: %w", err)
		}
	}
	ann[UncompressedSizeAnnotation] = strconv.FormatInt(b.plainSize, 10)
	return &BuildResult{
		Compression:      b.opts.Compression,
		Digest:           b.outDigest.Digest(),
		Size:             int64(b.outSize),
		TOCDigest:        digest.FromBytes(tocJSON),
		DiffID:           b.diff.Digest(),
		UncompressedSize: b.plainSize,
		Entries:          len(toc.Entries),
		Annotations:      ann,
	}, nil
}
