// Package snapshot implements lazypull's containerd snapshotter: an overlayfs
// snapshotter (containerd's snapshots.Snapshotter) that can also serve image
// layers "remotely", mounted lazily through a LayerFS instead of being
// downloaded and unpacked.
//
// # On disk
//
// Everything lives under one root directory:
//
//	<root>/metadata.db          bbolt metadata (containerd's snapshots/storage)
//	<root>/snapshots/<id>/fs    the snapshot's contents: an overlay upperdir for
//	                            active snapshots, the layer for committed ones;
//	                            for a remote snapshot, the LayerFS mountpoint
//	<root>/snapshots/<id>/work  overlay workdir of an active snapshot
//
// A snapshot without parents is a bind mount of its fs directory (read-only
// for a view). An active snapshot with parents is an overlay mount whose
// upperdir is its fs directory and whose lowerdirs are its parents' fs
// directories; a view of a single parent is a read-only bind mount of that
// parent, a view of several parents an overlay without upperdir. Prepare
// always returns writable mounts: containerd 2.4's unpacker takes a
// successful Prepare whose last mount is read-only as "already staged".
//
// # Remote snapshots
//
// containerd's unpacker prepares one snapshot per image layer with
// Prepare(key, parent) and the label containerd.io/snapshot.ref set to the
// chain ID the layer will be committed as; labels of the layer descriptor
// whose names start with containerd.io/snapshot/ ride along (CRI adds
// cri.image-ref, cri.layer-digest and cri.image-layers). When such a Prepare
// names a layer (see LayerRef) and a LayerFS is configured, the snapshotter:
//
//  1. creates the active snapshot key as usual,
//  2. asks LayerFS.Mount to mount the layer read-only on its fs directory,
//  3. commits it under the chain ID with the Prepare labels plus
//     LabelRemote="true" (so containerd's Walk filter
//     labels."containerd.io/snapshot.ref"==<chain>,parent==<parent> finds it;
//     the active key disappears with the commit), and
//  4. returns an error wrapping errdefs.ErrAlreadyExists, which tells
//     containerd to skip download and unpack.
//
// If the chain ID is already committed on the same parent, Prepare returns
// ErrAlreadyExists at once. If LayerFS.Mount fails, the reason is logged with
// the layer digest and Prepare carries on as a normal Prepare: containerd then
// pulls and unpacks the layer itself.
//
// A remote snapshot is an ordinary committed snapshot to everything else: it
// can be the parent of further snapshots, its fs directory (the LayerFS
// mountpoint) serving as an overlay lowerdir. Whenever Prepare, View or
// Mounts hands out mounts that use remote lowers, the snapshotter first calls
// LayerFS.Check on each of them and remounts the layer if it is unhealthy;
// if that fails too, the call fails with errdefs.ErrUnavailable naming the
// layer. Removing a remote snapshot unmounts it. Usage of a remote snapshot is
// the layer's uncompressed size, recorded at commit: from the LayerFS when
// it is a LayerSizer (from the verified TOC), else from
// LabelUncompressedSize when present, else 0; the FUSE tree is never walked.
//
// On start-up New first lazily unmounts whatever is still mounted on
// <root>/snapshots/<id>/fs (a crashed daemon leaves dead FUSE mounts behind,
// which fail every access with ENOTCONN), then mounts every remote snapshot
// again with its stored labels, in the background and a few at a time, so
// that start-up never waits for the network. A layer that cannot be
// remounted is logged and stays unavailable until a later Check/remount
// succeeds. Close unmounts all remote layers.
package snapshot
