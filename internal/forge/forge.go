// Package forge builds hostile eStargz blobs for tests: layers whose TOC
// serves other files than their tar stream holds, the attack that
// whole-layer verification exists to stop. Nothing outside tests uses it.
package forge

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"

	"github.com/lazypull/lazypull/estargz"
)

// ServeOtherFile rewrites the TOC of a gzip eStargz blob so that file
// victim is served with the content of file source: victim's chunk points
// at source's compressed member and carries source's digests, so every
// chunk a reader fetches verifies. The payload (and so the tar stream
// outside the TOC entry) is unchanged. It returns the forged blob and the
// digest of its TOC (what the forger annotates the layer with). Both files
// must be single-chunk regular files.
func ServeOtherFile(blob []byte, victim, source string) ([]byte, digest.Digest, error) {
	return RewriteTOC(blob, func(toc *estargz.TOC) error {
		var v, s *estargz.TOCEntry
		for _, e := range toc.Entries {
			switch e.Name {
			case victim:
				v = e
			case source:
				s = e
			}
		}
		if v == nil || s == nil {
			return fmt.Errorf("forge: %q or %q is not in the TOC", victim, source)
		}
		v.Offset, v.InnerOffset, v.ChunkDigest, v.Digest, v.Size = s.Offset, s.InnerOffset, s.ChunkDigest, s.Digest, s.Size
		return nil
	})
}

// DeclareFileDigest rewrites the TOC of a gzip eStargz blob so that file
// name's whole-file digest (the TOC entry's "digest", which no chunk read
// checks) is d, leaving its chunks and the payload unchanged. It returns
// the forged blob and the digest of its TOC.
func DeclareFileDigest(blob []byte, name string, d digest.Digest) ([]byte, digest.Digest, error) {
	return RewriteTOC(blob, func(toc *estargz.TOC) error {
		for _, e := range toc.Entries {
			if e.Name == name && e.Type == estargz.TypeReg {
				e.Digest = d.String()
				return nil
			}
		}
		return fmt.Errorf("forge: %q is not a regular file in the TOC", name)
	})
}

// RewriteTOC rewrites the TOC of a gzip eStargz blob with edit, keeping
// the payload, and returns the forged blob and the digest of its TOC.
func RewriteTOC(blob []byte, edit func(*estargz.TOC) error) ([]byte, digest.Digest, error) {
	footer, tocJSON, err := estargz.ReadTOC(bytes.NewReader(blob), int64(len(blob)), estargz.OpenOptions{})
	if err != nil {
		return nil, "", err
	}
	if footer.Compression != estargz.Gzip {
		return nil, "", fmt.Errorf("forge: only gzip eStargz blobs are supported")
	}
	var toc estargz.TOC
	if err := json.Unmarshal(tocJSON, &toc); err != nil {
		return nil, "", err
	}
	if err := edit(&toc); err != nil {
		return nil, "", err
	}
	forged, err := json.Marshal(&toc)
	if err != nil {
		return nil, "", err
	}
	var out bytes.Buffer
	out.Write(blob[:footer.TOCOffset])
	zw, err := gzip.NewWriterLevel(&out, gzip.BestCompression)
	if err != nil {
		return nil, "", err
	}
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: estargz.TOCTarName, Mode: 0o644, Size: int64(len(forged))}); err != nil {
		return nil, "", err
	}
	if _, err := tw.Write(forged); err != nil {
		return nil, "", err
	}
	if err := tw.Close(); err != nil {
		return nil, "", err
	}
	if err := zw.Close(); err != nil {
		return nil, "", err
	}
	// The 51-byte eStargz footer: an empty gzip member whose extra field
	// holds the TOC offset.
	out.Write([]byte{0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, 'S', 'G', 22, 0})
	fmt.Fprintf(&out, "%016xSTARGZ", footer.TOCOffset)
	out.Write([]byte{0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0})
	return out.Bytes(), digest.FromBytes(forged), nil
}
