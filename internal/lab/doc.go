// Package lab runs the real parts lazypull is tested and benchmarked
// against, as processes owned by a test or a benchmark: containerd daemons,
// an in-process OCI registry, the lazypull-snapshotter daemon, and the
// helpers to pull, run and inspect images through a snapshotter.
//
//   - Containerd starts a containerd daemon (1.6 or 2.x, see Version) whose
//     root, state and sockets all live in one short directory under /tmp,
//     with a generated config that disables CRI and other plugins the tests
//     do not need and can name proxy snapshotters. It serves a v2 Go client,
//     pulls (Pull), runs containers (Run) and reads an image's rootfs as a
//     snapshotter presents it (ImageTree, a fixture.Tree).
//   - Registry serves the distribution registry in-process on 127.0.0.1,
//     can be stopped and started again on the same port, and takes images
//     built with package fixture (Push).
//   - Snapshotter runs a snapshotter daemon binary (lazypull-snapshotter) with
//     --address/--root/--config and can stop, kill and restart it; Build and
//     BuildSnapshotter are the one way tests build lazypull's binaries.
//
// Functions named New* take a testing.TB, fail the test on error and clean
// up with t.Cleanup; the Start* forms return errors and leave Close to the
// caller, for environments shared by a whole test binary (TestMain) or by
// the benchmark. Close unmounts what is left below a daemon's directory with
// containerd's mount helpers.
//
// Everything here needs root, overlayfs and the binaries installed by
// hack/install-deps.sh; a missing binary is an error, never a skip.
package lab
