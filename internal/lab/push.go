package lab

import (
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/internal/fixture"
)

// Resolver returns a resolver that talks plain HTTP to registries on
// localhost and 127.0.0.1.
func Resolver() remotes.Resolver {
	return docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchLocalhost)),
	})
}

// Push uploads the image's blobs and then its manifest under nameTag
// ("app:v1"), and returns the full reference.
func (r *Registry) Push(ctx context.Context, nameTag string, img *fixture.Image) (string, error) {
	ref := r.Ref(nameTag)
	pusher, err := Resolver().Pusher(ctx, ref)
	if err != nil {
		return "", err
	}
	push := func(desc ocispec.Descriptor, data []byte) error {
		w, err := pusher.Push(ctx, desc)
		if errdefs.IsAlreadyExists(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("push %s: %w", desc.Digest, err)
		}
		defer w.Close()
		if _, err := w.Write(data); err != nil {
			return fmt.Errorf("push %s: %w", desc.Digest, err)
		}
		if err := w.Commit(ctx, desc.Size, desc.Digest); err != nil && !errdefs.IsAlreadyExists(err) {
			return fmt.Errorf("push %s: commit: %w", desc.Digest, err)
		}
		return nil
	}
	for _, l := range img.Layers {
		if err := push(l.Descriptor(), l.Data); err != nil {
			return "", err
		}
	}
	if err := push(img.Manifest.Config, img.ConfigBytes); err != nil {
		return "", err
	}
	if err := push(img.Descriptor(), img.ManifestBytes); err != nil {
		return "", err
	}
	return ref, nil
}
