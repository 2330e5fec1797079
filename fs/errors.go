// Errors of the package. Errors that reach containerd carry an errdefs
// class, so the snapshotter can map them to gRPC codes.

package fs

import "github.com/containerd/errdefs"

// ErrVerify is returned (wrapped) when fetched bytes fail verification: a
// chunk that does not decode or does not hash to its TOC digest, or a TOC
// that does not hash to the layer's toc.digest. It matches
// errdefs.ErrDataLoss with errors.Is, and an error wrapping it also wraps
// the estargz error (estargz.ErrDigest, estargz.ErrFormat) that says what
// exactly was wrong.
var ErrVerify error = &classError{msg: "failed verification", class: errdefs.ErrDataLoss}

// classError is a sentinel that belongs to an errdefs class.
type classError struct {
	msg   string
	class error
}

func (e *classError) Error() string { return e.msg }
func (e *classError) Unwrap() error { return e.class }
