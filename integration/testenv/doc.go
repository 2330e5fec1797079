// Package testenv is lazypull's end-to-end test harness: real containerd
// daemons, an in-process OCI registry, image fixtures built from tar streams,
// and helpers to pull, run and inspect images through a snapshotter.
//
// The pieces, each usable on its own:
//
//   - Containerd starts a containerd daemon (1.6 or 2.x, see Version) whose
//     root, state and sockets all live in one short directory under /tmp,
//     with a generated config that disables CRI and other plugins the tests
//     do not need and can name proxy snapshotters. It serves a v2 Go client.
//   - Registry serves the distribution registry in-process on 127.0.0.1 and
//     can be stopped and started again on the same port.
//   - Layer, LayerBlob and Image build OCI images from tar entries (files,
//     dirs, symlinks, hardlinks, devices, fifos, xattrs, whiteouts, opaque
//     dirs); BusyboxLayer gives a base layer with a runnable static busybox.
//   - Tree describes a file tree (type, mode, owner, size, mtime, link,
//     device, xattrs, content digest, hardlink group); WalkTree reads one
//     from disk, ExpectedTree computes an image's merged rootfs from its layer
//     tars, and Diff compares two readably.
//   - Snapshotter runs a snapshotter daemon binary (lazypull-snapshotter) with
//     --address/--root/--config and can stop, kill and restart it.
//
// Functions named New* take a testing.TB, fail the test on error and clean
// up with t.Cleanup; the Start* forms return errors and leave Close to the
// caller, for environments shared by a whole test binary (TestMain).
//
// Everything here needs root, overlayfs and the binaries installed by
// hack/install-deps.sh; a missing binary is an error, never a skip.
package testenv
