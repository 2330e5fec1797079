// Errors of the package. Each sentinel belongs to a containerd errdefs
// class (errors.Is(err, errdefs.ErrNotFound) and so on hold for it and for
// errors wrapping it), so that errors reaching containerd map to the right
// gRPC codes; their messages are their own.

package cache

import (
	"errors"
	"syscall"

	"github.com/containerd/errdefs"
)

var (
	// ErrNotFound is returned (possibly wrapped) when an entry is in neither
	// tier, including when an on-disk entry was found corrupt or missing and
	// discarded. It matches errdefs.ErrNotFound.
	ErrNotFound error = &classError{"cache entry not found", errdefs.ErrNotFound}

	// ErrTooLarge is returned by Add when an entry is larger than the tier
	// that should persist it (the disk tier, or the memory tier of a
	// memory-only store) can ever hold. It matches
	// errdefs.ErrResourceExhausted.
	ErrTooLarge error = &classError{"cache: entry larger than cache limit", errdefs.ErrResourceExhausted}

	// ErrCorrupt is returned (wrapped) by AddFrom when the bytes streamed do
	// not hash to the digest they are added under. It matches
	// errdefs.ErrDataLoss.
	ErrCorrupt error = &classError{"content does not match its digest", errdefs.ErrDataLoss}

	// ErrClosed is returned by operations on a closed Store. It matches
	// errdefs.ErrUnavailable.
	ErrClosed error = &classError{"cache: store is closed", errdefs.ErrUnavailable}

	// ErrLocked is returned by Open when another Store, in this or another
	// process, has the directory open. It matches errdefs.ErrUnavailable.
	ErrLocked error = &classError{"cache: directory in use by another store", errdefs.ErrUnavailable}
)

// classError is a sentinel that belongs to an errdefs class.
type classError struct {
	msg   string
	class error
}

func (e *classError) Error() string { return e.msg }
func (e *classError) Unwrap() error { return e.class }

// classifyWrite adds errdefs.ErrResourceExhausted to a write error caused
// by a full file system or an exhausted quota; the cause stays matchable
// (errors.Is(err, syscall.ENOSPC)).
func classifyWrite(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return &classedCause{err: err, class: errdefs.ErrResourceExhausted}
	}
	return err
}

// classedCause is an error of some cause, with an errdefs class added.
type classedCause struct {
	err   error
	class error
}

func (e *classedCause) Error() string   { return e.err.Error() }
func (e *classedCause) Unwrap() []error { return []error{e.err, e.class} }
