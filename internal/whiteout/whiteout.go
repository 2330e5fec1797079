// Package whiteout names the markers of the OCI image layer format and of
// overlayfs that lazypull reads, presents and tests against, so that every
// package spells them the same way.
//
// A layer deletes a path of the layers below it with an empty file named
// Prefix+BASE beside it, and hides everything the layers below put in a
// directory with an empty file named Opaque inside it. A lower directory of
// overlayfs shows the first as a 0/0 character device BASE and the second
// as the xattr OpaqueXattr (or UserOpaqueXattr with the userxattr mount
// option) set to "y" on the directory.
package whiteout

import "strings"

const (
	// Prefix starts the name of a whiteout entry: ".wh.BASE" deletes BASE.
	Prefix = ".wh."
	// Opaque is the name of the entry that makes its directory opaque.
	Opaque = Prefix + Prefix + ".opq"
	// OpaqueXattr marks an opaque directory for overlayfs.
	OpaqueXattr = "trusted.overlay.opaque"
	// UserOpaqueXattr marks an opaque directory for overlayfs mounted with
	// userxattr (in a user namespace).
	UserOpaqueXattr = "user.overlay.opaque"
	// OverlayXattrPrefix and UserOverlayXattrPrefix start the xattrs
	// overlayfs keeps for itself; they are never part of an image.
	OverlayXattrPrefix     = "trusted.overlay."
	UserOverlayXattrPrefix = "user.overlay."
)

// IsOverlayXattr reports whether name is one of overlayfs' own xattrs.
func IsOverlayXattr(name string) bool {
	return strings.HasPrefix(name, OverlayXattrPrefix) || strings.HasPrefix(name, UserOverlayXattrPrefix)
}
