// Parsing the TOC: bounding it (Limits), decoding the JSON, then
// validating every entry while the Index is built from it (validate.go).
// The TOC is untrusted input: anything a well-formed eStargz writer would
// not produce, and that could make a reader misbehave, is rejected with an
// *Error, and Limits bound the work.

package estargz

import (
	"bytes"
	"errors"
	"fmt"

	gojson "github.com/goccy/go-json"
	"github.com/opencontainers/go-digest"
)

// Limits bounds what ParseTOC and Open accept from a blob.
type Limits struct {
	// MaxTOCSize is the largest TOC JSON accepted, in bytes (default
	// 128 MiB, enough for several hundred thousand entries).
	MaxTOCSize int64
	// MaxEntries is the most TOC entries accepted (default 1 Mi). An
	// entry costs about 700 bytes of index in memory, so the default
	// bounds one index to about 750 MiB.
	MaxEntries int
	// MaxChunkSize is the largest plain size of a chunk, and of the
	// compressed member holding it up to the chunk's end (innerOffset
	// plus size), accepted (default 64 MiB; writers split files into
	// 4 MiB chunks). A chunk's compressed extent (from its member's
	// offset to the next member's) may exceed its member's plain size
	// only by what incompressible data and the tar headers riding along
	// can add: 1/64 of it plus MaxExtentSlack. Reading a chunk holds
	// its extent and its plain bytes in memory, so these bound the
	// memory one fetch can be made to take.
	MaxChunkSize int64
}

// Default limits.
const (
	DefaultMaxTOCSize = 128 << 20
	DefaultMaxEntries = 1 << 20
	// DefaultMaxChunkSize is Limits.MaxChunkSize's default.
	DefaultMaxChunkSize = 64 << 20
	// MaxExtentSlack is how many bytes a chunk's compressed extent may
	// exceed its member's plain size by (plus 1/64 of it): room for the
	// headers of the non-regular entries that follow a payload in its
	// member (a few dozen compressed bytes each) and for compression
	// overhead.
	MaxExtentSlack = 16 << 20
	// maxFileSize bounds a regular file's declared size (1 PiB).
	maxFileSize = 1 << 50
	// maxHardlinkDepth bounds hardlink-to-hardlink chains.
	maxHardlinkDepth = 32
	// maxNameLen bounds entry and hardlink target names (PATH_MAX). It
	// also keeps indexing linear: every ancestor of a name is a map key.
	maxNameLen = 4096
	// implicitDirSlack is how many more directories than entries a TOC
	// may imply by the names of its entries.
	implicitDirSlack = 1 << 16
)

func (l Limits) withDefaults() Limits {
	if l.MaxTOCSize <= 0 {
		l.MaxTOCSize = DefaultMaxTOCSize
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	if l.MaxChunkSize <= 0 {
		l.MaxChunkSize = DefaultMaxChunkSize
	}
	return l
}

// ParseTOC parses and validates TOC JSON read from a blob whose payload
// region ends at payloadEnd (Footer.PayloadEnd). It rejects anything a
// well-formed eStargz writer would not produce and that could make a reader
// misbehave: unsafe names, duplicate names, unknown types, chunks that
// overlap, leave gaps or do not add up to the file size, offsets outside the
// payload region, hardlinks to missing or directory targets, chunks larger
// than Limits.MaxChunkSize or with a compressed extent out of proportion to
// their plain size, and TOCs larger than the limits. Besides the limits, a TOC may not imply (by the names of
// its entries) more than 65536 directories beyond its number of entries,
// which keeps indexing time and memory linear in the TOC size.
func ParseTOC(tocJSON []byte, payloadEnd int64, limits Limits) (*Index, error) {
	limits = limits.withDefaults()
	if int64(len(tocJSON)) > limits.MaxTOCSize {
		return nil, errorf(ErrTOCTooLarge, "", -1, "%d bytes, limit %d", len(tocJSON), limits.MaxTOCSize)
	}
	// Decoding allocates an entry for each element of the entries array,
	// however short its JSON ("0," is two bytes): count them first.
	if n := countTopLevelArrayElements(tocJSON, limits.MaxEntries); n > limits.MaxEntries {
		return nil, errorf(ErrTOCTooLarge, "", -1, "more than %d entries", limits.MaxEntries)
	}
	toc, err := decodeTOC(tocJSON)
	if err != nil {
		return nil, wrapErr(ErrFormat, "", -1, err, "decoding TOC JSON")
	}
	if len(toc.Entries) > limits.MaxEntries {
		return nil, errorf(ErrTOCTooLarge, "", -1, "%d entries, limit %d", len(toc.Entries), limits.MaxEntries)
	}
	ix, err := buildIndex(toc, payloadEnd, limits.MaxChunkSize)
	if err != nil {
		return nil, err
	}
	ix.TOCDigest = digest.FromBytes(tocJSON)
	return ix, nil
}

// countTopLevelArrayElements counts the elements of the arrays that are
// values of the top-level JSON object (in a TOC, the entries), stopping
// once the count exceeds limit. It only tracks strings and nesting, so it
// is cheap; the result is exact for well-formed JSON.
func countTopLevelArrayElements(p []byte, limit int) int {
	var (
		depth   int
		inArray bool // inside an array at depth 2 (a top-level value)
		counted bool // the current element of that array was counted
		n       int
	)
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch c {
		case ' ', '\t', '\n', '\r', ':':
			continue
		case ',':
			if depth == 2 && inArray {
				counted = false
			}
			continue
		case '}', ']':
			depth--
			if depth < 2 {
				inArray = false
			}
			continue
		}
		// c starts a value or is part of a literal.
		if depth == 2 && inArray && !counted {
			counted = true
			if n++; n > limit {
				return n
			}
		}
		switch c {
		case '"':
			// Skip to the closing quote: one not preceded by an odd
			// number of backslashes.
			for {
				k := bytes.IndexByte(p[i+1:], '"')
				if k < 0 {
					return n
				}
				i += 1 + k
				bs := 0
				for b := i - 1; b >= 0 && p[b] == '\\'; b-- {
					bs++
				}
				if bs%2 == 0 {
					break
				}
			}
		case '{', '[':
			depth++
			if depth == 2 {
				inArray, counted = c == '[', false
			}
		}
	}
	return n
}

// parseDigest validates a TOC digest. sha256 digests, all that eStargz
// writers produce, are checked by hand (digest.Parse's regular expression
// is most of the time an index of a large TOC takes); others go through
// digest.Parse.
func parseDigest(s string) (digest.Digest, error) {
	const prefix = "sha256:"
	if len(s) == len(prefix)+64 && s[:len(prefix)] == prefix {
		for i := len(prefix); i < len(s); i++ {
			if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
				return "", fmt.Errorf("invalid sha256 digest %q: bad character %q", s, c)
			}
		}
		return digest.Digest(s), nil
	}
	return digest.Parse(s)
}

// decodeTOC decodes TOC JSON with goccy/go-json, about three times as fast
// as encoding/json on large TOCs (it decides how long a large layer's mount
// takes). A panic inside the decoder on hostile input is an error, not a
// crash.
func decodeTOC(b []byte) (toc *TOC, err error) {
	defer func() {
		if r := recover(); r != nil {
			toc, err = nil, errors.New("malformed JSON")
		}
	}()
	toc = new(TOC)
	if err := gojson.Unmarshal(b, toc); err != nil {
		return nil, err
	}
	return toc, nil
}
