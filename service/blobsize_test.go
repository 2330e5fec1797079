package service

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/remote/remotetest"
)

// The blob size comes from the image's manifest (by the digest containerd
// labels the snapshot with) and is checked against the registry's: a
// manifest that gives another size refuses the mount with an error naming
// both; a layer the manifest does not list is refused; the true size
// mounts.
func TestBlobSizeFromManifest(t *testing.T) {
	requireRoot(t)
	reg := remotetest.NewRegistry(t)
	l := honestLayer(t, map[string]string{"bin/x": "x"})
	other := honestLayer(t, map[string]string{"bin/x": "other"})
	desc := reg.PushBlob(t, "app", l.blob)
	otherDesc := reg.PushBlob(t, "app", other.blob)
	manifest := func(tag string, layers ...ocispec.Descriptor) digest.Digest {
		cfg := reg.PushBlob(t, "app", []byte("{}"))
		raw, err := json.Marshal(ocispec.Manifest{
			Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
			Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: cfg.Digest, Size: cfg.Size},
			Layers: layers,
		})
		if err != nil {
			t.Fatal(err)
		}
		return reg.PushManifest(t, "app", tag, raw).Digest
	}
	layer := func(size int64) ocispec.Descriptor {
		return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: desc.Digest, Size: size}
	}
	lying := manifest("lying", layer(desc.Size+1000))
	without := manifest("without", ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: otherDesc.Digest, Size: otherDesc.Size})
	honest := manifest("honest", layer(desc.Size))

	svc, err := New(context.Background(), Options{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	ctx := context.Background()
	mount := func(tag string, md digest.Digest) error {
		labels := layerLabels(reg.Ref("app", tag), l, l.diffID.String(), "")
		labels[snapshotters.TargetManifestDigestLabel] = md.String()
		return svc.LayerFS().Mount(ctx, filepath.Join(t.TempDir(), "mnt"), labels)
	}

	err = mount("lying", lying)
	if err == nil || !strings.Contains(err.Error(), strconv.FormatInt(desc.Size, 10)) || !strings.Contains(err.Error(), strconv.FormatInt(desc.Size+1000, 10)) {
		t.Fatalf("mount with the manifest's wrong size: %v; want an error naming both sizes", err)
	}
	t.Log(err)
	if err := mount("without", without); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("mount of a layer its manifest does not list: %v; want ErrInvalidArgument", err)
	}
	if err := mount("honest", honest); err != nil {
		t.Fatalf("mount with the true size: %v", err)
	}
}
