package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/platforms"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/snapshot"
)

func newPullCommand() *cobra.Command {
	var (
		rf          registryFlags
		address     string
		namespace   string
		snapshotter string
		platform    string
	)
	cmd := &cobra.Command{
		Use:   "pull [flags] REF",
		Short: "Pull an image into containerd with its layers mounted lazily",
		Long: `Pull image REF into containerd through the lazypull snapshotter: eStargz layers
are mounted lazily (only the manifest, config and TOCs are fetched now), other
layers are pulled normally. Afterwards the image runs like any other, e.g. with
ctr run --snapshotter lazypull.`,
		Example: `  lazypull pull 127.0.0.1:5000/app:v1-esgz
  ctr run --rm --snapshotter lazypull 127.0.0.1:5000/app:v1-esgz app1`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageError{fmt.Errorf("pull needs REF, got %d arguments", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			_, plats, err := parsePlatforms(platform)
			if err != nil {
				return err
			}
			matcher := platforms.Default()
			if len(plats) > 0 {
				matcher = platforms.Ordered(plats...)
			}
			client, err := containerd.New(address, containerd.WithDefaultNamespace(namespace), containerd.WithTimeout(10*time.Second))
			if err != nil {
				return fmt.Errorf("connecting to containerd at %s: %w", address, err)
			}
			defer client.Close()
			return pull(ctx, cmd, client, args[0], snapshotter, matcher, rf)
		},
	}
	rf.add(cmd)
	f := cmd.Flags()
	f.StringVar(&address, "address", "/run/containerd/containerd.sock", "containerd socket")
	f.StringVarP(&namespace, "namespace", "n", "default", "containerd namespace")
	f.StringVar(&snapshotter, "snapshotter", "lazypull", "snapshotter to unpack into")
	f.StringVar(&platform, "platform", "", "platform to pull (default: this host's)")
	return cmd
}

// resolver returns a containerd resolver honouring hosts.toml, plain HTTP
// and docker credentials.
func (f *registryFlags) resolver(ctx context.Context) docker.ResolverOptions {
	ho := config.HostOptions{HostDir: config.HostDirFromRoot(f.hostsDir), Credentials: f.credentials()}
	if f.plainHTTP {
		ho.DefaultScheme = "http"
	}
	return docker.ResolverOptions{Hosts: config.ConfigureHosts(ctx, ho)}
}

func pull(ctx context.Context, cmd *cobra.Command, client *containerd.Client, ref, snapshotter string, matcher platforms.MatchComparer, rf registryFlags) error {
	pg := newProgress(cmd.ErrOrStderr())
	var mu sync.Mutex
	layers := map[string]ocispec.Descriptor{}
	track := images.HandlerFunc(func(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
		if images.IsLayerType(desc.MediaType) {
			mu.Lock()
			layers[desc.Digest.String()] = desc
			mu.Unlock()
			mode := "normal"
			if desc.Annotations[estargz.TOCDigestAnnotation] != "" {
				mode = "lazy"
			}
			pg.update(desc.Digest.Encoded()[:12], mode, 0, desc.Size)
		}
		return nil, nil
	})
	start := time.Now()
	resolver := docker.NewResolver(rf.resolver(ctx))
	img, err := client.Pull(ctx, ref,
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(snapshotter),
		containerd.WithResolver(resolver),
		containerd.WithPlatformMatcher(matcher),
		containerd.WithImageHandler(track),
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	)
	if err != nil {
		pg.wait()
		return fmt.Errorf("pulling %s: %w", ref, err)
	}
	// Report which layers ended up lazily mounted.
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		pg.wait()
		return err
	}
	manifest, err := images.Manifest(ctx, client.ContentStore(), img.Target(), matcher)
	if err != nil {
		pg.wait()
		return err
	}
	sn := client.SnapshotService(snapshotter)
	lazy := 0
	for i, l := range manifest.Layers {
		chain := identity.ChainID(diffIDs[:i+1]).String()
		state := "unpacked"
		if info, err := sn.Stat(ctx, chain); err == nil && info.Labels[snapshot.LabelRemote] == "true" {
			state = "lazy"
			lazy++
		}
		pg.update(l.Digest.Encoded()[:12], state, l.Size, l.Size)
		pg.finish(l.Digest.Encoded()[:12], state)
	}
	pg.wait()
	fmt.Fprintf(cmd.OutOrStdout(), "%s %s: %d of %d layers lazy, %s\n", img.Name(), img.Target().Digest, lazy, len(manifest.Layers), time.Since(start).Round(time.Millisecond))
	return nil
}
