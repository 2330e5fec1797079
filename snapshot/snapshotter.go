package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"
)

// Options configures a Snapshotter.
type Options struct {
	// Root is the directory holding metadata.db and snapshots/. It is
	// created if missing. Required.
	Root string

	// LayerFS serves remote snapshots. Nil makes a plain overlayfs
	// snapshotter (remote snapshots already in the metadata then stay
	// unavailable).
	LayerFS LayerFS

	// AsyncRemove makes Remove only drop the metadata; snapshot directories
	// are deleted by the next Cleanup. Remote layers are unmounted by Remove
	// either way.
	AsyncRemove bool

	// MountOptions are added to every overlay mount (not to bind mounts).
	// index=off and, in a user namespace, userxattr are added unless set.
	MountOptions []string

	// RestoreConcurrency bounds how many remote layers New mounts again at
	// the same time. Zero means 8.
	RestoreConcurrency int

	// MetadataLockTimeout bounds the wait for the lock on metadata.db held
	// by another process using the same root. Zero means 3s.
	MetadataLockTimeout time.Duration
}

// Snapshotter is a containerd snapshots.Snapshotter on overlayfs that can
// serve layers remotely through a LayerFS. See the package documentation.
type Snapshotter struct {
	root        string
	ms          *storage.MetaStore
	layers      LayerFS
	asyncRemove bool
	overlayOpts []string

	mu      sync.Mutex
	remotes map[string]*remoteLayer // by snapshot ID

	bgCtx    context.Context // background work (restore); canceled by Close
	bgCancel context.CancelFunc
	bgWG     sync.WaitGroup

	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

var (
	_ snapshots.Snapshotter = (*Snapshotter)(nil)
	_ snapshots.Cleaner     = (*Snapshotter)(nil)
)

// New opens (or creates) a snapshotter on opt.Root. It cleans up mounts left
// on snapshot directories by an earlier run and starts mounting the remote
// snapshots found in the metadata again in the background; it does not wait
// for them.
func New(ctx context.Context, opt Options) (*Snapshotter, error) {
	if opt.Root == "" {
		return nil, fmt.Errorf("snapshotter root directory not set: %w", errdefs.ErrInvalidArgument)
	}
	root, err := filepath.Abs(opt.Root)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	// Mount points in /proc/self/mountinfo have symlinks resolved.
	if root, err = filepath.EvalSymlinks(root); err != nil {
		return nil, err
	}
	if ok, err := fs.SupportsDType(root); err != nil {
		return nil, fmt.Errorf("checking d_type support of %s: %w", root, err)
	} else if !ok {
		return nil, fmt.Errorf("%s does not support d_type, which overlayfs needs (xfs must be formatted with ftype=1)", root)
	}
	if err := os.Mkdir(filepath.Join(root, "snapshots"), 0o700); err != nil && !os.IsExist(err) {
		return nil, err
	}

	lockTimeout := opt.MetadataLockTimeout
	if lockTimeout <= 0 {
		lockTimeout = 3 * time.Second
	}
	dbPath := filepath.Join(root, "metadata.db")
	ms, err := storage.NewMetaStore(dbPath, func(o *bolt.Options) error {
		o.Timeout = lockTimeout
		return nil
	})
	if err != nil {
		return nil, err
	}

	s := &Snapshotter{
		root:        root,
		ms:          ms,
		layers:      opt.LayerFS,
		asyncRemove: opt.AsyncRemove,
		overlayOpts: overlayOptions(opt.MountOptions),
		remotes:     map[string]*remoteLayer{},
	}

	// Opening the database takes its lock: from here on no other
	// snapshotter works on this root, so mounts on it are stale.
	var remotes []*remoteLayer
	if err := s.withTx(ctx, false, func(ctx context.Context) error {
		var err error
		remotes, err = s.loadRemotes(ctx)
		return err
	}); err != nil {
		ms.Close()
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("%s is locked: is another snapshotter using root %s? %w", dbPath, root, err)
		}
		return nil, fmt.Errorf("reading %s: %w", dbPath, err)
	}
	live := s.adoptMounts(ctx, remotes)
	if err := unmountStale(ctx, filepath.Join(root, "snapshots"), live); err != nil {
		log.G(ctx).WithError(err).Error("failed to unmount stale mounts")
	}

	s.bgCtx, s.bgCancel = context.WithCancel(context.WithoutCancel(ctx))
	s.restore(ctx, remotes, opt.RestoreConcurrency)
	return s, nil
}

// withTx runs fn in a metadata transaction.
func (s *Snapshotter) withTx(ctx context.Context, writable bool, fn storage.TransactionCallback) error {
	if s.closed.Load() {
		return fmt.Errorf("snapshotter is closed: %w", errdefs.ErrUnavailable)
	}
	return s.ms.WithTransaction(ctx, writable, fn)
}

func (s *Snapshotter) snapshotDir(id string) string {
	return filepath.Join(s.root, "snapshots", id)
}

func (s *Snapshotter) fsPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "fs")
}

func (s *Snapshotter) workPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "work")
}

// Stat returns the info of the snapshot named key.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.withTx(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update updates the labels of a snapshot. The labels a remote snapshot
// was committed with (those naming the layer and LabelRemote) are pinned:
// they are put back if an update drops or changes them.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (newInfo snapshots.Info, err error) {
	err = s.withTx(ctx, true, func(ctx context.Context) error {
		id, _, _, err := storage.GetInfo(ctx, info.Name)
		if err != nil {
			return err
		}
		if newInfo, err = storage.UpdateInfo(ctx, info, fieldpaths...); err != nil {
			return err
		}
		rl := s.remote(id)
		if rl == nil {
			return nil
		}
		var restore []string
		for k, v := range rl.pinned {
			if newInfo.Labels[k] != v {
				restore = append(restore, "labels."+k)
			}
		}
		if len(restore) == 0 {
			return nil
		}
		log.G(ctx).WithField("snapshot", info.Name).WithField("labels", restore).Debug("keeping the labels of a remote snapshot")
		newInfo, err = storage.UpdateInfo(ctx, snapshots.Info{Name: info.Name, Labels: rl.pinned}, restore...)
		return err
	})
	return newInfo, err
}

// Usage returns the disk usage of a snapshot: measured for active ones,
// as recorded at commit for committed ones (remote: see LabelUncompressedSize).
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	if err := s.withTx(ctx, false, func(ctx context.Context) (err error) {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, s.fsPath(id))
		if err != nil {
			return snapshots.Usage{}, err
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Mounts returns the mounts of the active or view snapshot key. Remote
// lower layers are checked (and remounted if needed) first.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var sn storage.Snapshot
	if err := s.withTx(ctx, false, func(ctx context.Context) (err error) {
		sn, err = storage.GetSnapshot(ctx, key)
		if err != nil {
			return fmt.Errorf("failed to get mounts of %s: %w", key, err)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	if err := s.ensureLowers(ctx, sn.ParentIDs); err != nil {
		return nil, err
	}
	return s.mounts(sn), nil
}

// Prepare creates an active snapshot key on parent and returns its
// (writable) mounts. With a layer's labels and a LayerFS it may instead
// commit a remote snapshot and return ErrAlreadyExists: see the package
// documentation.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	if target := base.Labels[snapshots.LabelSnapshotRef]; target != "" {
		return s.prepareTarget(ctx, key, parent, target, base.Labels, opts)
	}
	return s.create(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only snapshot key of parent and returns its mounts.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.create(ctx, snapshots.KindView, key, parent, opts)
}

// Commit turns the active snapshot key into the committed snapshot name.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	var id string
	if err := s.withTx(ctx, false, func(ctx context.Context) (err error) {
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return err
	}
	// Measure outside the write transaction: it can take a while.
	du, err := fs.DiskUsage(ctx, s.fsPath(id))
	if err != nil {
		return fmt.Errorf("failed to measure snapshot %s: %w", key, err)
	}
	return s.withTx(ctx, true, func(ctx context.Context) error {
		if id2, _, _, err := storage.GetInfo(ctx, key); err != nil {
			return err
		} else if id2 != id {
			// key was removed and created again meanwhile.
			if du, err = fs.DiskUsage(ctx, s.fsPath(id2)); err != nil {
				return err
			}
		}
		if _, err := storage.CommitActive(ctx, key, name, snapshots.Usage(du), opts...); err != nil {
			return fmt.Errorf("failed to commit snapshot %s: %w", key, err)
		}
		return nil
	})
}

// Remove removes the snapshot key, unmounting it if it is remote (and then
// letting a LayerSweeper drop the state of layers no snapshot uses any
// more). Its directory is deleted now, or by Cleanup with
// Options.AsyncRemove.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	var (
		id, parent string
		removals   []string
	)
	if err := s.withTx(ctx, true, func(ctx context.Context) (err error) {
		if _, info, _, err := storage.GetInfo(ctx, key); err == nil {
			parent = info.Parent
		}
		if id, _, err = storage.Remove(ctx, key); err != nil {
			return fmt.Errorf("failed to remove snapshot %s: %w", key, err)
		}
		if !s.asyncRemove {
			if removals, err = s.orphanDirs(ctx); err != nil {
				return fmt.Errorf("failed to list directories to remove: %w", err)
			}
		}
		return nil
	}); err != nil {
		return err
	}
	// The metadata is gone; failures from here on are logged, not returned.
	if s.dropRemote(ctx, id) {
		s.sweepLayers(ctx)
	}
	for _, dir := range removals {
		if err := removeDir(ctx, dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("failed to remove snapshot directory")
		}
	}
	// A layer that failed verification goes with the last snapshot on it.
	if parent != "" && s.failedParent(parent) {
		if err := s.Remove(ctx, parent); err != nil {
			log.G(ctx).WithError(err).WithField("snapshot", parent).Debug("failed layer still in use")
		} else {
			log.G(ctx).WithField("snapshot", parent).Warn("removed the snapshot of a layer that failed verification")
		}
	}
	return nil
}

// Walk calls fn for every snapshot matching the filters (containerd filter
// syntax, e.g. labels."containerd.io/snapshot.ref"==<chain>,parent==<p>).
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.withTx(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Cleanup deletes snapshot directories that have no metadata (left by
// asynchronous removal or by a crash), unmounting them first if needed.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	var dirs []string
	// A write transaction keeps snapshots from being created meanwhile.
	if err := s.withTx(ctx, true, func(ctx context.Context) (err error) {
		dirs, err = s.orphanDirs(ctx)
		return err
	}); err != nil {
		return err
	}
	for _, dir := range dirs {
		if err := removeDir(ctx, dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("failed to remove snapshot directory")
		}
	}
	return nil
}

// Close stops background work, unmounts remote layers and closes the
// metadata store. Calling it again does nothing.
func (s *Snapshotter) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		s.bgCancel()
		s.bgWG.Wait()
		ctx := log.WithLogger(context.Background(), log.G(s.bgCtx))
		if _, ok := s.layers.(MountLister); ok {
			// The mounts live in another process and stay for the
			// next daemon: running containers keep reading them.
			s.closeErr = s.ms.Close()
			return
		}
		s.mu.Lock()
		remotes := make([]*remoteLayer, 0, len(s.remotes))
		for _, rl := range s.remotes {
			remotes = append(remotes, rl)
		}
		s.mu.Unlock()
		for _, rl := range remotes {
			rl.mu.Lock()
			if rl.mounted {
				s.unmountLayer(ctx, rl)
			}
			rl.mu.Unlock()
		}
		s.closeErr = s.ms.Close()
	})
	return s.closeErr
}

// orphanDirs lists the snapshot directories without metadata. It needs a
// transaction in ctx.
func (s *Snapshotter) orphanDirs(ctx context.Context) ([]string, error) {
	ids, err := storage.IDMap(ctx)
	if err != nil && !errdefs.IsNotFound(err) { // NotFound: no snapshots yet
		return nil, err
	}
	dir := filepath.Join(s.root, "snapshots")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var orphans []string
	for _, e := range entries {
		if _, ok := ids[e.Name()]; !ok {
			orphans = append(orphans, filepath.Join(dir, e.Name()))
		}
	}
	return orphans, nil
}

// create makes an active or view snapshot and returns its mounts.
func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, retErr error) {
	sn, err := s.createSnapshot(ctx, kind, key, parent, opts)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			if err := s.Remove(ctx, key); err != nil {
				log.G(ctx).WithError(err).WithField("key", key).Error("failed to roll back snapshot")
			}
		}
	}()
	if err := s.ensureLowers(ctx, sn.ParentIDs); err != nil {
		return nil, err
	}
	if kind == snapshots.KindActive && len(sn.ParentIDs) > 0 {
		if err := s.copyRootOwner(sn); err != nil {
			return nil, err
		}
	}
	return s.mounts(sn), nil
}

// createSnapshot records a new active or view snapshot and creates its
// directories.
func (s *Snapshotter) createSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (sn storage.Snapshot, retErr error) {
	var tmp string
	defer func() {
		if tmp != "" {
			if err := os.RemoveAll(tmp); err != nil {
				log.G(ctx).WithError(err).WithField("path", tmp).Warn("failed to remove temporary snapshot directory")
			}
		}
	}()
	err := s.withTx(ctx, true, func(ctx context.Context) (err error) {
		if tmp, err = s.newDir(kind); err != nil {
			return fmt.Errorf("failed to create snapshot directory: %w", err)
		}
		if sn, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...); err != nil {
			return fmt.Errorf("failed to create snapshot %s: %w", key, err)
		}
		// Renaming last: if the transaction fails after this, the directory
		// has no metadata and Cleanup will take it.
		if err := os.Rename(tmp, s.snapshotDir(sn.ID)); err != nil {
			return fmt.Errorf("failed to create snapshot directory: %w", err)
		}
		tmp = ""
		return nil
	})
	return sn, err
}

// newDir creates a temporary snapshot directory with fs (and for active
// snapshots work) inside.
func (s *Snapshotter) newDir(kind snapshots.Kind) (string, error) {
	td, err := os.MkdirTemp(filepath.Join(s.root, "snapshots"), "new-")
	if err != nil {
		return "", err
	}
	// Explicit modes: the daemon's umask must not leak into snapshots.
	dirs := []struct {
		name string
		mode os.FileMode
	}{{"fs", 0o755}}
	if kind == snapshots.KindActive {
		dirs = append(dirs, struct {
			name string
			mode os.FileMode
		}{"work", 0o711})
	}
	for _, d := range dirs {
		p := filepath.Join(td, d.name)
		if err := os.Mkdir(p, d.mode); err != nil {
			return td, err
		}
		if err := os.Chmod(p, d.mode); err != nil {
			return td, err
		}
	}
	return td, nil
}

// copyRootOwner gives the upper directory of a new active snapshot the
// owner of its parent's root, which overlayfs shows as the owner of "/".
func (s *Snapshotter) copyRootOwner(sn storage.Snapshot) error {
	var pst, st syscall.Stat_t
	if err := syscall.Stat(s.fsPath(sn.ParentIDs[0]), &pst); err != nil {
		return fmt.Errorf("failed to stat parent: %w", &os.PathError{Op: "stat", Path: s.fsPath(sn.ParentIDs[0]), Err: err})
	}
	upper := s.fsPath(sn.ID)
	if err := syscall.Stat(upper, &st); err != nil {
		return err
	}
	if st.Uid == pst.Uid && st.Gid == pst.Gid {
		return nil
	}
	if err := os.Lchown(upper, int(pst.Uid), int(pst.Gid)); err != nil {
		return fmt.Errorf("failed to chown: %w", err)
	}
	return nil
}

// mounts returns the mounts of an active or view snapshot.
func (s *Snapshotter) mounts(sn storage.Snapshot) []mount.Mount {
	if len(sn.ParentIDs) == 0 {
		mode := "rw"
		if sn.Kind == snapshots.KindView {
			mode = "ro"
		}
		return []mount.Mount{{
			Type:    "bind",
			Source:  s.fsPath(sn.ID),
			Options: []string{mode, "rbind"},
		}}
	}
	var opts []string
	if sn.Kind == snapshots.KindActive {
		opts = append(opts,
			"workdir="+s.workPath(sn.ID),
			"upperdir="+s.fsPath(sn.ID),
		)
	} else if len(sn.ParentIDs) == 1 {
		return []mount.Mount{{
			Type:    "bind",
			Source:  s.fsPath(sn.ParentIDs[0]),
			Options: []string{"ro", "rbind"},
		}}
	}
	lower := ""
	for i, id := range sn.ParentIDs {
		if i > 0 {
			lower += ":"
		}
		lower += s.fsPath(id)
	}
	opts = append(opts, "lowerdir="+lower)
	opts = append(opts, s.overlayOpts...)
	return []mount.Mount{{
		Type:    "overlay",
		Source:  "overlay",
		Options: opts,
	}}
}
