package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"github.com/moby/sys/userns"
	"golang.org/x/sys/unix"
)

// mountpointsUnder returns the mount points at or below dir, deepest first.
// It reads /proc/self/mountinfo and never touches the mounted file systems,
// so it is safe on dead FUSE mounts.
func mountpointsUnder(dir string) ([]*mountinfo.Info, error) {
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return nil, fmt.Errorf("reading mount table: %w", err)
	}
	sort.SliceStable(infos, func(i, j int) bool {
		return len(infos[i].Mountpoint) > len(infos[j].Mountpoint)
	})
	return infos, nil
}

// isMounted reports whether something is mounted exactly at path.
func isMounted(path string) (bool, error) {
	infos, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(path))
	if err != nil {
		return false, fmt.Errorf("reading mount table: %w", err)
	}
	return len(infos) > 0, nil
}

// detach lazily unmounts path (MNT_DETACH). Not being mounted is not an error.
func detach(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return &os.PathError{Op: "umount", Path: path, Err: err}
	}
	return nil
}

// removeDir deletes a snapshot directory. Anything still mounted below it is
// lazily unmounted first; if that fails the directory is left alone, so that
// removal can never reach into a mounted file system.
func removeDir(ctx context.Context, dir string) error {
	mps, err := mountpointsUnder(dir)
	if err != nil {
		return err
	}
	for _, m := range mps {
		log.G(ctx).WithField("mountpoint", m.Mountpoint).WithField("fstype", m.FSType).Warn("unmounting before removing snapshot directory")
		if err := detach(m.Mountpoint); err != nil {
			return fmt.Errorf("not removing %s: %w", dir, err)
		}
	}
	if len(mps) > 0 {
		// Make sure the detach took before deleting anything.
		if left, err := mountpointsUnder(dir); err != nil {
			return err
		} else if len(left) > 0 {
			return fmt.Errorf("not removing %s: %s is still mounted", dir, left[0].Mountpoint)
		}
	}
	return os.RemoveAll(dir)
}

// unmountStale lazily unmounts everything mounted on <snapshots>/<id>/fs.
// Those can only be left over from an earlier run (a crashed daemon leaves
// dead FUSE mounts that fail with ENOTCONN). Mounts elsewhere below the
// snapshots directory are not ours and are left alone.
// Mountpoints in keep (live mounts of a MountLister) are left alone.
func unmountStale(ctx context.Context, snapshotsDir string, keep map[string]bool) error {
	mps, err := mountpointsUnder(snapshotsDir)
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range mps {
		rel, err := filepath.Rel(snapshotsDir, m.Mountpoint)
		parts := strings.Split(rel, string(filepath.Separator))
		if err != nil || len(parts) != 2 || parts[1] != "fs" {
			log.G(ctx).WithField("mountpoint", m.Mountpoint).Warn("unexpected mount below the snapshots directory; leaving it")
			continue
		}
		if keep[m.Mountpoint] {
			continue
		}
		l := log.G(ctx).WithField("mountpoint", m.Mountpoint).WithField("fstype", m.FSType)
		if m.FSType == "fuse" || strings.HasPrefix(m.FSType, "fuse.") {
			l.Warn("lazily unmounting stale FUSE mount left by a previous run")
		} else {
			l.Warn("lazily unmounting mount left by a previous run")
		}
		if err := detach(m.Mountpoint); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// overlayOptions returns the options added to every overlay mount: the
// caller's, plus index=off where the kernel knows the option (lower
// directories are shared between many overlays, which the index feature
// does not allow) and userxattr inside a user namespace.
func overlayOptions(extra []string) []string {
	opts := append([]string(nil), extra...)
	if _, err := os.Stat("/sys/module/overlay/parameters/index"); err == nil && !hasOption(opts, "index") {
		opts = append(opts, "index=off")
	}
	if userns.RunningInUserNS() && !hasOption(opts, "userxattr") {
		opts = append(opts, "userxattr")
	}
	return opts
}

// hasOption reports whether key appears in opts, bare or as key=value.
func hasOption(opts []string, key string) bool {
	for _, o := range opts {
		if k, _, _ := strings.Cut(o, "="); k == key {
			return true
		}
	}
	return false
}
