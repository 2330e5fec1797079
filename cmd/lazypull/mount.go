package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/cache"
	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/service"
)

// defaultCacheDir is where the CLI keeps chunks and layer metadata.
const defaultCacheDir = "/var/cache/lazypull"

func newMountCommand() *cobra.Command {
	var (
		rf          registryFlags
		platform    string
		cacheDir    string
		verbose     bool
		fallback    bool
		blob        string
		prefetch    bool
		background  bool
		passthrough bool
		unverified  bool
		timeout     time.Duration
		recordDir   string
	)
	cmd := &cobra.Command{
		Use:   "mount [flags] REF DIR\n  lazypull mount --blob FILE DIR",
		Short: "Mount an image's root file system lazily, read-only, without containerd",
		Long: `Mount the merged root file system of image REF read-only at DIR: every eStargz
layer is mounted through FUSE straight from the registry, fetching only the
chunks that are read, and the layers are stacked with overlayfs. The command
stays in the foreground, prints one line when DIR is ready, and unmounts
everything and exits 0 on SIGINT/SIGTERM or when DIR is unmounted.

With --blob, mount one local eStargz blob file at DIR instead.`,
		Example: `  lazypull mount 127.0.0.1:5000/app:v1-esgz /mnt/app
  lazypull mount --blob layer.tar.gz /mnt/layer`,
		Args: func(cmd *cobra.Command, args []string) error {
			want := 2
			if blob != "" {
				want = 1
			}
			if len(args) != want {
				if blob != "" {
					return usageError{fmt.Errorf("mount --blob FILE needs DIR, got %d arguments", len(args))}
				}
				return usageError{fmt.Errorf("mount needs REF and DIR, got %d arguments", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if verbose {
				_ = log.SetLevel("debug")
			}
			dir := args[len(args)-1]
			if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
				return usageError{fmt.Errorf("mount point %q is not a directory", dir)}
			}
			cfg := service.DefaultConfig()
			cfg.AllowUnverified = unverified
			cfg.RecordDir = recordDir
			cfg.Fetch.Prefetch = prefetch
			cfg.Fetch.BackgroundFetch = background
			cfg.Fetch.Passthrough = passthrough
			cfg.Fetch.ReadTimeout = service.Duration(timeout)
			// Whole-layer verification protects snapshots that other
			// images reuse; a private mount has none.
			cfg.Verify.Policy = service.VerifyOff
			if blob != "" {
				store, err := cache.Open(cache.Options{Dir: filepath.Join(cacheDir, "chunks")})
				if err != nil {
					return fmt.Errorf("opening cache %s: %w", cacheDir, err)
				}
				defer store.Close()
				lo := lfs.LayerOptions{FetchTimeout: timeout}
				mo := lfs.MountOptions{Passthrough: passthrough}
				return mountBlob(ctx, cmd, blob, dir, store, lo, mo)
			}
			_, plats, err := parsePlatforms(platform)
			if err != nil {
				return err
			}
			var plat *ocispec.Platform
			if len(plats) > 1 {
				return usageError{errors.New("--platform: mount takes one platform")}
			} else if len(plats) == 1 {
				plat = &plats[0]
			}
			reg, err := rf.registry()
			if err != nil {
				return err
			}
			svc, err := service.New(ctx, service.Options{
				Config:   cfg,
				Root:     filepath.Join(cacheDir, "meta"),
				CacheDir: filepath.Join(cacheDir, "chunks"),
				Registry: reg,
			})
			if err != nil {
				return err
			}
			defer svc.Close()
			mgr := svc.Manager
			return mountImage(ctx, cmd, reg, mgr, args[0], dir, plat, fallback)
		},
	}
	rf.add(cmd)
	f := cmd.Flags()
	f.StringVar(&platform, "platform", "", "platform to mount from an index (default: this host's)")
	f.StringVar(&cacheDir, "cache-dir", defaultCacheDir, "directory for cached chunks and layer metadata")
	f.BoolVarP(&verbose, "verbose", "v", false, "log every fetch and mount step")
	f.BoolVar(&fallback, "fallback", false, "fetch and unpack layers that are not eStargz instead of failing")
	f.StringVar(&blob, "blob", "", "mount this local eStargz blob file instead of an image")
	f.BoolVar(&prefetch, "prefetch", true, "prefetch each layer's prioritized files after mounting")
	f.BoolVar(&background, "background", false, "fetch the rest of each layer in the background")
	f.BoolVar(&passthrough, "passthrough", true, "let the kernel read cached single-chunk files directly (Linux >= 6.9)")
	f.BoolVar(&unverified, "allow-unverified", false, "mount layers that have no TOC digest annotation")
	f.StringVar(&recordDir, "record", "", "record the files the image reads, in first-read order, in DIR/<ref>.txt (for convert --prioritize)")
	f.DurationVar(&timeout, "fetch-timeout", lfs.DefaultFetchTimeout, "give up on (and fail with EIO) a read whose data cannot be fetched in this time")
	return cmd
}

func mountBlob(ctx context.Context, cmd *cobra.Command, blob, dir string, store lfs.Store, lo lfs.LayerOptions, mo lfs.MountOptions) error {
	l, closeBlob, err := lfs.OpenLocalLayer(blob, store, lo)
	if err != nil {
		return err
	}
	defer closeBlob()
	m, err := lfs.MountLayer(dir, l, mo)
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "lazypull: mounted blob %s (%s) at %s\n", blob, l.Digest(), dir)
	waitUnmounted(ctx, dir)
	return m.Unmount()
}

// mountImage mounts every layer, stacks them at dir and waits.
func mountImage(ctx context.Context, cmd *cobra.Command, reg *remote.Registry, mgr *lfs.Manager, ref, dir string, plat *ocispec.Platform, fallback bool) error {
	img, err := reg.Resolve(ctx, ref, plat)
	if err != nil {
		return err
	}
	lowers, cleanup, err := mountLayers(ctx, reg, mgr, img, fallback)
	defer cleanup()
	if err != nil {
		return err
	}
	if err := stack(lowers, dir); err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "lazypull: mounted %s (%s, %d layers) at %s\n", img.Ref, platforms.Format(platformOf(img)), len(lowers), dir)
	waitUnmounted(ctx, dir)
	if mounted, _ := mountinfo.Mounted(dir); mounted {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmounting %s: %w", dir, err)
		}
	}
	return nil
}

// mountLayers mounts every layer of img lazily (or unpacks it, with
// fallback, when it is not eStargz) in directories of a temporary one and
// returns them, bottom layer first. cleanup unmounts and removes them; it
// must be called, also on error, after whatever stacks them is unmounted.
func mountLayers(ctx context.Context, reg *remote.Registry, mgr *lfs.Manager, img *remote.Image, fallback bool) (lowers []string, cleanup func(), err error) {
	work, err := os.MkdirTemp("", "lazypull-mount-")
	if err != nil {
		return nil, func() {}, err
	}
	cleanup = func() {
		// Unmount the layers before removing their directories (and
		// work): RemoveAll must not walk into a mounted layer, and the
		// directories must not outlive the command.
		busy := false
		for _, l := range lowers {
			if _, ok := mgr.Lookup(l); ok {
				if err := mgr.Unmount(context.Background(), l); err != nil {
					log.G(ctx).WithError(err).Warn("unmounting layer")
					busy = true
					continue
				}
			}
			_ = os.RemoveAll(l)
		}
		if !busy {
			_ = os.RemoveAll(work)
		}
	}
	for i, l := range img.Manifest.Layers {
		ldir := filepath.Join(work, fmt.Sprintf("layer%03d", i))
		toc := l.Annotations[estargz.TOCDigestAnnotation]
		if toc == "" && !fallback {
			return lowers, cleanup, fmt.Errorf("layer %d (%s, %s) is not eStargz: it has no %s annotation (convert the image with lazypull convert, or use --fallback)",
				i+1, l.Digest, l.MediaType, estargz.TOCDigestAnnotation)
		}
		start := time.Now()
		if toc != "" {
			_, err = mgr.Mount(ctx, ldir, lfs.LayerSource{Ref: img.Ref, Digest: l.Digest, Size: l.Size, TOCDigest: digest.Digest(toc)})
		} else {
			err = unpackLayer(ctx, reg, img.Ref, l, ldir)
		}
		if err != nil {
			return lowers, cleanup, fmt.Errorf("layer %d (%s): %w", i+1, l.Digest, err)
		}
		log.G(ctx).WithField("layer", l.Digest).WithField("took", time.Since(start)).Debug("layer ready")
		lowers = append(lowers, ldir)
	}
	return lowers, cleanup, nil
}

func platformOf(img *remote.Image) ocispec.Platform {
	if img.ManifestDesc.Platform != nil {
		return *img.ManifestDesc.Platform
	}
	return ocispec.Platform{OS: img.Config.OS, Architecture: img.Config.Architecture, Variant: img.Config.Variant}
}

// stack mounts lowers (bottom first) read-only, nosuid and nodev at dir:
// an overlay, or a bind mount when there is one layer.
func stack(lowers []string, dir string) error {
	if len(lowers) == 1 {
		if err := unix.Mount(lowers[0], dir, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mounting the layer at %s: %w", dir, err)
		}
		if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
			_ = unix.Unmount(dir, unix.MNT_DETACH)
			return fmt.Errorf("making %s read-only: %w", dir, err)
		}
		return nil
	}
	top := make([]string, len(lowers))
	for i, l := range lowers {
		top[len(lowers)-1-i] = l
	}
	// nosuid, nodev: the image's setuid files and device nodes must not
	// take effect on the host through the mount.
	m := mount.Mount{Type: "overlay", Source: "overlay", Options: []string{"ro", "nosuid", "nodev", "lowerdir=" + strings.Join(top, ":")}}
	if err := m.Mount(dir); err != nil {
		return fmt.Errorf("mounting overlay at %s: %w", dir, err)
	}
	return nil
}

// unpackLayer fetches a non-eStargz layer and unpacks it into dir the way
// containerd would for overlayfs (whiteouts become devices and xattrs).
func unpackLayer(ctx context.Context, reg *remote.Registry, ref string, l ocispec.Descriptor, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rc, err := reg.Fetch(ctx, ref, l)
	if err != nil {
		return err
	}
	defer rc.Close()
	ds, err := compression.DecompressStream(rc)
	if err != nil {
		return fmt.Errorf("decompressing: %w", err)
	}
	defer ds.Close()
	if _, err := archive.Apply(ctx, dir, ds, archive.WithConvertWhiteout(archive.OverlayConvertWhiteout)); err != nil {
		return fmt.Errorf("unpacking: %w", err)
	}
	_, err = io.Copy(io.Discard, ds)
	return err
}

// waitUnmounted returns when ctx is done or dir stops being a mount point.
func waitUnmounted(ctx context.Context, dir string) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if mounted, err := mountinfo.Mounted(dir); err == nil && !mounted {
				return
			}
		}
	}
}
