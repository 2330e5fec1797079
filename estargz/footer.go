package estargz

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Compression is the compression of an eStargz blob's members.
type Compression int

const (
	// Gzip is eStargz proper: gzip members, TOC as a tar entry.
	Gzip Compression = iota
	// Zstd is zstd:chunked: zstd frames, TOC in a skippable frame.
	Zstd
)

// String returns "gzip" or "zstd:chunked".
func (c Compression) String() string {
	switch c {
	case Gzip:
		return "gzip"
	case Zstd:
		return "zstd:chunked"
	}
	return fmt.Sprintf("compression(%d)", int(c))
}

// MediaType returns the OCI layer media type for blobs of this compression.
func (c Compression) MediaType() string {
	if c == Zstd {
		return MediaTypeLayerZstd
	}
	return MediaTypeLayerGzip
}

// Footer sizes. MaxFooterSize is the most a reader needs from the end of a
// blob to find any footer.
const (
	gzipFooterSize       = 51
	legacyGzipFooterSize = 47
	zstdFooterPayload    = 40
	zstdFooterSize       = skippableHeaderSize + zstdFooterPayload
	skippableHeaderSize  = 8
	// MaxFooterSize is the largest footer of any supported flavour.
	MaxFooterSize = gzipFooterSize
)

var (
	// gzipFooterHeader is the fixed gzip member header of a footer: magic,
	// deflate, FEXTRA, zero mtime, no extra flags, OS "unknown".
	gzipFooterHeader = []byte{0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff}
	// emptyStoredBlock is a final stored deflate block of length zero.
	emptyStoredBlock = []byte{0x01, 0x00, 0x00, 0xff, 0xff}
	// skippableFrameMagic is the zstd skippable frame magic 0x184D2A50 (LE).
	skippableFrameMagic = []byte{0x50, 0x2a, 0x4d, 0x18}
	// zstdChunkedMagic ends the zstd:chunked footer.
	zstdChunkedMagic = []byte("GnUlInUx")
	gzipMagic        = []byte{0x1f, 0x8b}
	zstdFrameMagic   = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// Footer is what the end of a blob says about where its TOC is.
type Footer struct {
	// Compression of the blob.
	Compression Compression
	// Legacy is true for the 47-byte CRFS footer.
	Legacy bool
	// Size is the footer's length in bytes at the end of the blob.
	Size int64
	// TOCOffset is the offset of the TOC's compressed bytes: the gzip
	// member holding the TOC tar entry, or the zstd-compressed TOC inside
	// its skippable frame.
	TOCOffset int64
	// TOCCompressedSize is the TOC's compressed length (zstd:chunked; for
	// gzip it is everything up to the footer).
	TOCCompressedSize int64
	// TOCSize is the TOC JSON's uncompressed length, when the footer
	// records it (zstd:chunked), else 0.
	TOCSize int64
	// PayloadEnd is the end of the region holding file payloads: chunk
	// members never extend beyond it.
	PayloadEnd int64
}

// gzipFooter returns the 51-byte footer pointing at a TOC member at tocOff.
func gzipFooter(tocOff int64) []byte {
	b := make([]byte, 0, gzipFooterSize)
	b = append(b, gzipFooterHeader...)
	b = binary.LittleEndian.AppendUint16(b, 4+22) // XLEN
	b = append(b, 'S', 'G')
	b = binary.LittleEndian.AppendUint16(b, 22) // subfield length
	b = fmt.Appendf(b, "%016xSTARGZ", tocOff)
	b = append(b, emptyStoredBlock...)
	b = append(b, make([]byte, 8)...) // CRC32 and ISIZE of nothing
	return b
}

// zstdFooter returns the skippable frame that ends a zstd:chunked blob.
func zstdFooter(tocOff, tocCompressed, tocSize int64) []byte {
	p := make([]byte, 0, zstdFooterPayload)
	p = binary.LittleEndian.AppendUint64(p, uint64(tocOff))
	p = binary.LittleEndian.AppendUint64(p, uint64(tocCompressed))
	p = binary.LittleEndian.AppendUint64(p, uint64(tocSize))
	p = binary.LittleEndian.AppendUint64(p, 1) // manifest type: CRFS-style TOC
	p = append(p, zstdChunkedMagic...)
	return skippableFrame(p)
}

// skippableFrame wraps p in a zstd skippable frame.
func skippableFrame(p []byte) []byte {
	b := make([]byte, 0, skippableHeaderSize+len(p))
	b = append(b, skippableFrameMagic...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(p)))
	return append(b, p...)
}

// ParseFooter finds the footer at the end of tail, the last bytes of a
// blob of blobSize bytes (at least MaxFooterSize of them, or the whole blob
// if it is smaller). It recognizes the zstd:chunked footer, the eStargz gzip
// footer and the legacy CRFS footer, and checks that the TOC position it
// records lies inside the blob.
func ParseFooter(tail []byte, blobSize int64) (*Footer, error) {
	if int64(len(tail)) > blobSize {
		return nil, errorf(ErrFormat, "", -1, "tail of %d bytes is longer than the blob (%d bytes)", len(tail), blobSize)
	}
	if len(tail) < legacyGzipFooterSize {
		return nil, errorf(ErrNotEStargz, "", -1, "blob of %d bytes is too small to hold a footer", blobSize)
	}
	if bytes.HasSuffix(tail, zstdChunkedMagic) {
		return parseZstdFooter(tail, blobSize)
	}
	var err51 error
	if len(tail) >= gzipFooterSize {
		f, err := parseGzipFooter(tail[len(tail)-gzipFooterSize:], blobSize, false)
		if err == nil {
			return f, nil
		}
		err51 = err
	}
	f, errLegacy := parseGzipFooter(tail[len(tail)-legacyGzipFooterSize:], blobSize, true)
	if errLegacy == nil {
		return f, nil
	}
	// Neither parses. When one of them at least starts like a footer (a
	// gzip header with only FEXTRA and the right extra length), say what
	// is wrong with it.
	if err51 != nil && looksLikeGzipFooter(tail[len(tail)-gzipFooterSize:], false) {
		return nil, err51
	}
	if looksLikeGzipFooter(tail[len(tail)-legacyGzipFooterSize:], true) {
		return nil, errLegacy
	}
	return nil, errorf(ErrNotEStargz, "", blobSize-int64(min(len(tail), gzipFooterSize)),
		"no eStargz (gzip or legacy) or zstd:chunked footer at the end of the blob")
}

func looksLikeGzipFooter(b []byte, legacy bool) bool {
	xlen := uint16(4 + 22)
	if legacy {
		xlen = 22
	}
	return bytes.HasPrefix(b, gzipFooterHeader[:4]) && binary.LittleEndian.Uint16(b[10:12]) == xlen
}

func parseGzipFooter(b []byte, blobSize int64, legacy bool) (*Footer, error) {
	xlen := 4 + 22
	if legacy {
		xlen = 22
	}
	off, err := parseGzipFooterFields(b, blobSize, xlen, legacy)
	if err != nil {
		if legacy {
			err.Msg = "legacy " + err.Msg
		}
		return nil, err
	}
	size := int64(len(b))
	return &Footer{
		Compression:       Gzip,
		Legacy:            legacy,
		Size:              size,
		TOCOffset:         off,
		TOCCompressedSize: blobSize - size - off,
		PayloadEnd:        off,
	}, nil
}

func parseGzipFooterFields(b []byte, blobSize int64, xlen int, legacy bool) (int64, *Error) {
	// Header: magic, CM=deflate, FLG=FEXTRA only. MTIME, XFL and OS are
	// not significant.
	if b[0] != 0x1f || b[1] != 0x8b || b[2] != 0x08 || b[3] != 0x04 {
		return 0, errorf(ErrFormat, "", -1, "footer is not a gzip member with only FEXTRA set")
	}
	if int(binary.LittleEndian.Uint16(b[10:12])) != xlen {
		return 0, errorf(ErrFormat, "", -1, "footer extra field length %d, want %d", binary.LittleEndian.Uint16(b[10:12]), xlen)
	}
	extra := b[12 : 12+xlen]
	if !legacy {
		if extra[0] != 'S' || extra[1] != 'G' || binary.LittleEndian.Uint16(extra[2:4]) != 22 {
			return 0, errorf(ErrFormat, "", -1, "footer subfield is not SG of length 22")
		}
		extra = extra[4:]
	}
	if string(extra[16:]) != "STARGZ" {
		return 0, errorf(ErrFormat, "", -1, "footer lacks the STARGZ magic")
	}
	off, ok := parseHex16(extra[:16])
	if !ok {
		return 0, errorf(ErrFormat, "", -1, "footer TOC offset %q is not 16 hex digits", extra[:16])
	}
	rest := b[12+xlen:]
	if !bytes.Equal(rest[:5], emptyStoredBlock) || !bytes.Equal(rest[5:], make([]byte, 8)) {
		return 0, errorf(ErrFormat, "", -1, "footer does not end with an empty stored block and zero trailer")
	}
	size := int64(len(b))
	if off < 0 || off >= blobSize-size {
		return 0, errorf(ErrFormat, "", off, "footer TOC offset outside the blob (%d bytes before a %d-byte footer)", blobSize-size, size)
	}
	return off, nil
}

func parseHex16(b []byte) (int64, bool) {
	var v uint64
	for _, c := range b {
		var d byte
		switch {
		case c >= '0' && c <= '9':
			d = c - '0'
		case c >= 'a' && c <= 'f':
			d = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			d = c - 'A' + 10
		default:
			return 0, false
		}
		v = v<<4 | uint64(d)
	}
	if v > 1<<62 {
		return 0, false
	}
	return int64(v), true
}

func parseZstdFooter(tail []byte, blobSize int64) (*Footer, error) {
	if len(tail) < zstdFooterSize {
		return nil, errorf(ErrFormat, "", -1, "zstd:chunked footer needs %d bytes, blob has %d", zstdFooterSize, len(tail))
	}
	fr := tail[len(tail)-zstdFooterSize:]
	if !bytes.Equal(fr[:4], skippableFrameMagic) || binary.LittleEndian.Uint32(fr[4:8]) != zstdFooterPayload {
		return nil, errorf(ErrFormat, "", blobSize-zstdFooterSize, "zstd:chunked footer is not a %d-byte skippable frame", zstdFooterPayload)
	}
	p := fr[skippableHeaderSize:]
	off := binary.LittleEndian.Uint64(p[0:8])
	csize := binary.LittleEndian.Uint64(p[8:16])
	usize := binary.LittleEndian.Uint64(p[16:24])
	mtype := binary.LittleEndian.Uint64(p[24:32])
	if mtype != 1 {
		return nil, errorf(ErrFormat, "", blobSize-zstdFooterPayload, "zstd:chunked manifest type %d, want 1", mtype)
	}
	limit := uint64(blobSize - zstdFooterSize)
	if off < skippableHeaderSize || off > limit || csize == 0 || csize > limit-off {
		return nil, errorf(ErrFormat, "", int64(min(off, 1<<62)), "zstd:chunked TOC (%d compressed bytes) does not fit before the footer", csize)
	}
	if usize > 1<<40 {
		return nil, errorf(ErrFormat, "", int64(off), "zstd:chunked TOC claims %d uncompressed bytes", usize)
	}
	return &Footer{
		Compression:       Zstd,
		Size:              zstdFooterSize,
		TOCOffset:         int64(off),
		TOCCompressedSize: int64(csize),
		TOCSize:           int64(usize),
		PayloadEnd:        int64(off) - skippableHeaderSize,
	}, nil
}
