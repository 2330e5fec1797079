package estargz

import (
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
)

// Kinds of errors. Every error returned for bad input is an *Error whose
// Kind is one of these, so callers can write errors.Is(err, ErrDigest).
var (
	// ErrNotEStargz: the blob has no eStargz or zstd:chunked footer.
	ErrNotEStargz = errors.New("not an eStargz blob")
	// ErrFormat: the footer, TOC or a compressed member is malformed.
	ErrFormat = errors.New("malformed eStargz")
	// ErrTOCTooLarge: the TOC exceeds the configured limit.
	ErrTOCTooLarge = errors.New("TOC too large")
	// ErrDigest: bytes do not match the digest recorded for them. It
	// matches errdefs.ErrDataLoss too.
	ErrDigest error = &kindError{msg: "digest mismatch", class: errdefs.ErrDataLoss}
	// ErrUnsafePath: an entry name or link escapes the layer root.
	ErrUnsafePath = errors.New("unsafe path")
)

// Error describes a problem with an eStargz blob: what kind, which entry,
// and where.
type Error struct {
	// Kind is one of the Err* values above.
	Kind error
	// Entry is the TOC entry name involved, if any.
	Entry string
	// Offset is the blob or file offset involved, or -1.
	Offset int64
	// Msg says what exactly is wrong.
	Msg string
	// Err is an underlying error, if any.
	Err error
}

func (e *Error) Error() string {
	s := "estargz: " + e.Kind.Error()
	if e.Entry != "" {
		s += fmt.Sprintf(": entry %q", e.Entry)
	}
	if e.Offset >= 0 {
		s += fmt.Sprintf(" at offset %d", e.Offset)
	}
	if e.Msg != "" {
		s += ": " + e.Msg
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns both the kind and the underlying error so that errors.Is
// matches either.
func (e *Error) Unwrap() []error {
	if e.Err != nil {
		return []error{e.Kind, e.Err}
	}
	return []error{e.Kind}
}

func errorf(kind error, entry string, off int64, format string, args ...any) *Error {
	return &Error{Kind: kind, Entry: entry, Offset: off, Msg: fmt.Sprintf(format, args...)}
}

func wrapErr(kind error, entry string, off int64, err error, format string, args ...any) *Error {
	return &Error{Kind: kind, Entry: entry, Offset: off, Msg: fmt.Sprintf(format, args...), Err: err}
}

// kindError is an error kind that belongs to a containerd errdefs class,
// so that errors.Is(err, errdefs.ErrDataLoss) holds for an *Error of that
// kind while its message stays the kind's own.
type kindError struct {
	msg   string
	class error
}

func (k *kindError) Error() string { return k.msg }
func (k *kindError) Unwrap() error { return k.class }
