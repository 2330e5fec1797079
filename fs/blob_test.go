package fs

import (
	"github.com/lazypull/lazypull/remote"
)

// The registry client satisfies the interface fs declares, without fs
// importing it.
var _ BlobOpener = (*remote.Registry)(nil)
