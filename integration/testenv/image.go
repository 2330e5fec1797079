package testenv

import (
	"context"
	"debug/elf"
	"encoding/json"
	"fmt"
	"os"
	"runtime"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Image is an OCI image (manifest, config, layer blobs) ready to push.
type Image struct {
	Layers        []LayerBlob
	Config        ocispec.Image
	ConfigBytes   []byte
	Manifest      ocispec.Manifest
	ManifestBytes []byte
}

// NewImage assembles an image for this machine's platform from layers,
// bottom first, with cfg as the container config (Cmd, Env, ...).
func NewImage(cfg ocispec.ImageConfig, layers ...LayerBlob) (*Image, error) {
	if len(layers) == 0 {
		return nil, fmt.Errorf("image without layers")
	}
	img := &Image{Layers: layers}
	created := DefaultModTime
	img.Config = ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH},
		Config:   cfg,
		RootFS:   ocispec.RootFS{Type: "layers"},
	}
	for _, l := range layers {
		img.Config.RootFS.DiffIDs = append(img.Config.RootFS.DiffIDs, l.DiffID)
		img.Config.History = append(img.Config.History, ocispec.History{Created: &created, CreatedBy: "lazypull testenv"})
	}
	var err error
	if img.ConfigBytes, err = json.Marshal(img.Config); err != nil {
		return nil, err
	}
	img.Manifest = ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config: ocispec.Descriptor{
			MediaType: ocispec.MediaTypeImageConfig,
			Digest:    digest.FromBytes(img.ConfigBytes),
			Size:      int64(len(img.ConfigBytes)),
		},
	}
	for _, l := range layers {
		img.Manifest.Layers = append(img.Manifest.Layers, l.Descriptor())
	}
	if img.ManifestBytes, err = json.Marshal(img.Manifest); err != nil {
		return nil, err
	}
	return img, nil
}

// BuildImage gzips the layers and assembles them with NewImage.
func BuildImage(cfg ocispec.ImageConfig, layers ...*Layer) (*Image, error) {
	blobs := make([]LayerBlob, len(layers))
	for i, l := range layers {
		b, err := GzipLayer(l)
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
		blobs[i] = b
	}
	return NewImage(cfg, blobs...)
}

// Descriptor is the manifest's descriptor.
func (img *Image) Descriptor() ocispec.Descriptor {
	return ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageManifest,
		Digest:    digest.FromBytes(img.ManifestBytes),
		Size:      int64(len(img.ManifestBytes)),
	}
}

// ChainID is the chain ID of the image's top layer: the name of the
// committed snapshot of its rootfs.
func (img *Image) ChainID() digest.Digest { return identity.ChainID(img.Config.RootFS.DiffIDs) }

// ExpectedTree is the image's rootfs as a snapshotter should present it:
// the layers' uncompressed tars applied in order.
func (img *Image) ExpectedTree() (Tree, error) {
	tars := make([][]byte, len(img.Layers))
	for i, l := range img.Layers {
		tars[i] = l.Uncompressed
	}
	return ExpectedTree(tars...)
}

// Resolver returns a resolver that talks plain HTTP to registries on
// localhost and 127.0.0.1.
func Resolver() remotes.Resolver {
	return docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchLocalhost)),
	})
}

// Push uploads the image's blobs and then its manifest under nameTag
// ("app:v1"), and returns the full reference.
func (r *Registry) Push(ctx context.Context, nameTag string, img *Image) (string, error) {
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

// BusyboxApplets are the commands BusyboxLayer links to busybox in /bin.
var BusyboxApplets = []string{
	"sh", "ash", "cat", "ls", "find", "stat", "sha256sum", "md5sum", "echo",
	"true", "false", "sleep", "test", "[", "readlink", "wc", "head", "tail",
	"env", "xargs", "grep", "sort", "id", "mkdir", "touch", "rm", "dd", "od",
	"cut", "tr", "printf", "du", "sync", "uname",
}

// BusyboxPath is the static busybox the base layer carries: the
// LAZYPULL_BUSYBOX environment variable, or /bin/busybox from Debian's
// busybox-static package. It must be statically linked, since the image
// has no libc.
func BusyboxPath() (string, error) {
	p := os.Getenv("LAZYPULL_BUSYBOX")
	if p == "" {
		p = "/bin/busybox"
	}
	f, err := elf.Open(p)
	if err != nil {
		return "", fmt.Errorf("busybox: %w (install busybox-static: hack/install-deps.sh)", err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return "", fmt.Errorf("busybox: %s is dynamically linked; install busybox-static (hack/install-deps.sh)", p)
		}
	}
	return p, nil
}

// BusyboxLayer returns a base layer with a runnable userland: /bin/busybox,
// /bin/<applet> symlinks for BusyboxApplets, /etc/passwd and /tmp.
func BusyboxLayer() (*Layer, error) {
	p, err := BusyboxPath()
	if err != nil {
		return nil, err
	}
	bin, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	l := NewLayer().
		Dir("bin").
		Dir("etc").
		Dir("tmp", Mode(0o1777)).
		FileBytes("bin/busybox", bin, Mode(0o755)).
		File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n").
		File("etc/group", "root:x:0:\n")
	for _, a := range BusyboxApplets {
		l.Symlink("bin/"+a, "busybox")
	}
	return l, l.Err()
}

// DefaultConfig is a container config for busybox images: PATH set, sh as
// the command.
func DefaultConfig() ocispec.ImageConfig {
	return ocispec.ImageConfig{
		Env: []string{"PATH=/bin"},
		Cmd: []string{"/bin/sh"},
	}
}
