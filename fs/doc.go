// Package fs serves eStargz layers as read-only FUSE file systems whose
// file contents are fetched lazily from the layer's registry blob.
//
// A Layer couples a validated TOC (estargz.Index) with a Blob (ranged reads
// of the compressed layer) and a chunk Store (the verified cache). A Manager
// opens blobs through a BlobOpener, the one thing fs needs from a registry
// client (*remote.Registry is one). Reading a
// file maps the byte range to chunks; each chunk is taken from the Store or
// fetched — one ranged request, possibly extended over neighbouring chunks
// (read-ahead) — decompressed, verified against its chunkDigest and only
// then stored and copied out. A chunk that fails verification is an EIO to
// the reader and an error log naming the layer, file and offset; its bytes
// are never served or cached.
//
// Mount exposes a Layer through go-fuse's node API. The tree is built
// lazily from the index: modes, owners, times, sizes, link counts
// (hardlinks share an inode and a stable inode number), symlinks, devices,
// fifos and xattrs are exact. Overlayfs whiteouts stored in the layer as
// ".wh.NAME" appear as 0/0 character devices NAME, and ".wh..wh..opq"
// marks its directory opaque through the trusted.overlay.opaque and
// user.overlay.opaque xattrs, so the mounts can be stacked as overlayfs
// lower directories exactly like an unpacked layer. Layers never change,
// so the kernel is allowed to cache entries, attributes and pages for a long
// time, and single-chunk files already on disk are served by FUSE
// passthrough where the kernel supports it.
//
// After mounting, a Layer can prefetch its prioritized region (the files
// before .prefetch.landmark) and then fetch the rest in the background.
// Foreground reads always win: background fetches wait while any
// foreground fetch is in flight (Scheduler).
package fs
