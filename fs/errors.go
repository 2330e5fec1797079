// Errors of the package.

package fs

import (
	"errors"
)

// ErrVerify is returned (wrapped) when fetched bytes fail verification.
var ErrVerify = errors.New("chunk failed verification")
