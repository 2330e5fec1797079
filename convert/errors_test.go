package convert_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// convertErr converts and expects an error that wraps is (when set) and
// whose message holds every one of want.
func convertErr(t *testing.T, src, dst convert.Store, is error, want ...string) error {
	t.Helper()
	o := opts(estargz.Gzip, nil)
	o.TempDir = t.TempDir()
	res, err := convert.Convert(context.Background(), src, dst, o)
	if err == nil {
		t.Fatalf("Convert succeeded (%+v), want an error", res.Desc)
	}
	t.Logf("error: %v", err)
	if is != nil && !errors.Is(err, is) {
		t.Errorf("error %q does not wrap %v", err, is)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %q", err, w)
		}
	}
	if ents, _ := os.ReadDir(o.TempDir); len(ents) > 0 {
		t.Errorf("temporary files left: %v", ents)
	}
	return err
}

// notTagged checks that a failed conversion left no tag (and, for a
// registry, pushed no manifest at all unless allowed).
func notTagged(t *testing.T, v view) {
	t.Helper()
	if d, _, ok := v.root(t); ok {
		t.Errorf("destination tagged with %s after a failure", d.Digest)
	}
}

func TestConvertErrorsRegistry(t *testing.T) {
	t.Parallel()
	weird := srcLayer{tar: []byte("x"), blob: []byte("not a layer"), desc: ocispec.Descriptor{MediaType: "application/vnd.example.weird", Digest: digest.FromString("not a layer"), Size: 11}}
	good := mkLayer(t, ocispec.MediaTypeImageLayerGzip, layerTar(t, 1))
	plain := mkLayer(t, ocispec.MediaTypeImageLayer, layerTar(t, 2))

	t.Run("unsupported-layer-media-type", func(t *testing.T) {
		t.Parallel()
		reg := remotetest.NewRegistry(t)
		src := mkImage(t, hostPlatform, false, good, weird)
		pushImage(t, reg, "app", "v1", src)
		c := newClient(t)
		reg.ResetRequests()
		convertErr(t, openStore(t, reg.Ref("app", "v1"), c), openStore(t, reg.Ref("app", "esgz"), c), errdefs.ErrNotImplemented,
			"layer 2", weird.desc.Digest.String(), "unsupported layer media type", "application/vnd.example.weird")
		notTagged(t, registryView{reg, "app", "esgz"})
		if w := manifestWrites(reg); len(w) > 0 {
			t.Errorf("manifests pushed: %v", w)
		}
	})

	t.Run("diff-ids-mismatch", func(t *testing.T) {
		t.Parallel()
		reg := remotetest.NewRegistry(t)
		src := mkImage(t, hostPlatform, false, good, plain)
		// A config listing one diff_id for the two layers.
		one := mkImage(t, hostPlatform, false, good)
		var m ocispec.Manifest
		json.Unmarshal(src.manifest, &m)
		m.Config = one.cfgDesc
		raw, _ := json.Marshal(m)
		src.blobs[one.cfgDesc.Digest] = one.config
		src.manifest = raw
		pushImage(t, reg, "app", "v1", src)
		c := newClient(t)
		reg.ResetRequests()
		convertErr(t, openStore(t, reg.Ref("app", "v1"), c), openStore(t, reg.Ref("app", "esgz"), c), nil,
			"1 diff_ids for 2 layers")
		notTagged(t, registryView{reg, "app", "esgz"})
		if w := blobWrites(reg); len(w) > 0 {
			t.Errorf("blobs uploaded before the config was checked: %v", w)
		}
	})

	t.Run("corrupted-blob", func(t *testing.T) {
		t.Parallel()
		for _, l := range []srcLayer{good, plain} {
			reg := remotetest.NewRegistry(t)
			src := mkImage(t, hostPlatform, false, l)
			pushImage(t, reg, "app", "v1", src)
			// Every read of the layer blob has its first byte flipped.
			reg.Inject(remotetest.Fault{Corrupt: true, Match: func(q remotetest.Request) bool {
				return remotetest.BlobGETs(q) && strings.HasSuffix(q.Path, l.desc.Digest.String())
			}})
			c := newClient(t)
			err := convertErr(t, openStore(t, reg.Ref("app", "v1"), c), openStore(t, reg.Ref("app", "esgz"), c), nil,
				l.desc.Digest.String())
			if !strings.Contains(err.Error(), "digest") && !strings.Contains(err.Error(), "match") {
				t.Errorf("%s layer: error %q does not say the content does not match", l.desc.MediaType, err)
			}
			notTagged(t, registryView{reg, "app", "esgz"})
		}
	})

	t.Run("partial-index", func(t *testing.T) {
		t.Parallel()
		reg := remotetest.NewRegistry(t)
		a := mkImage(t, ocispec.Platform{OS: "linux", Architecture: "amd64"}, false, good)
		b := mkImage(t, ocispec.Platform{OS: "linux", Architecture: "arm64"}, false, good, weird)
		pushImage(t, reg, "app", "", a)
		pushImage(t, reg, "app", "", b)
		idx, _ := indexOf(t, false, a.desc, b.desc)
		reg.PushManifest(t, "app", "v1", idx)
		c := newClient(t)
		convertErr(t, openStore(t, reg.Ref("app", "v1"), c), openStore(t, reg.Ref("app", "esgz"), c), errdefs.ErrNotImplemented,
			"unsupported layer media type")
		notTagged(t, registryView{reg, "app", "esgz"})
	})

	t.Run("missing-source", func(t *testing.T) {
		t.Parallel()
		reg := remotetest.NewRegistry(t)
		c := newClient(t)
		convertErr(t, openStore(t, reg.Ref("nothing", "v1"), c), openStore(t, reg.Ref("app", "esgz"), c), errdefs.ErrNotFound, "nothing")
	})
}

func TestConvertErrorsLayout(t *testing.T) {
	t.Parallel()
	a := mkImage(t, hostPlatform, false, mkLayer(t, ocispec.MediaTypeImageLayerGzip, layerTar(t, 1)))
	b := mkImage(t, hostPlatform, false, mkLayer(t, ocispec.MediaTypeImageLayer, layerTar(t, 2)), mkLayer(t, ocispec.MediaTypeImageLayerZstd, layerTar(t, 3)))

	t.Run("missing-tag", func(t *testing.T) {
		t.Parallel()
		in, out := newLayout(t), &layout{dir: t.TempDir()}
		in.putImage(t, a, "v1")
		convertErr(t, openStore(t, in.ref("nope"), nil), openStore(t, out.ref("v1"), nil), errdefs.ErrNotFound, `"nope"`, in.dir)
		notTagged(t, layoutView{out, "v1"})
	})

	t.Run("ambiguous", func(t *testing.T) {
		t.Parallel()
		in, out := newLayout(t), &layout{dir: t.TempDir()}
		in.putImage(t, a, "v1")
		in.putImage(t, b, "v2")
		convertErr(t, openStore(t, in.ref(""), nil), openStore(t, out.ref("v1"), nil), nil, "2 manifests", ":TAG", in.dir)
		notTagged(t, layoutView{out, "v1"})
	})

	t.Run("no-layout", func(t *testing.T) {
		t.Parallel()
		out := &layout{dir: t.TempDir()}
		convertErr(t, openStore(t, convert.LayoutPrefix+t.TempDir()+":v1", nil), openStore(t, out.ref("v1"), nil), errdefs.ErrNotFound, `"v1"`)
	})

	t.Run("corrupted-blob", func(t *testing.T) {
		t.Parallel()
		for i, l := range b.layers {
			in, out := newLayout(t), &layout{dir: t.TempDir()}
			in.putImage(t, b, "v1")
			// Flip a byte in the middle of the blob (same size).
			p := in.path(l.desc.Digest)
			blob, _ := os.ReadFile(p)
			blob[len(blob)/2] ^= 0xff
			os.WriteFile(p, blob, 0o644)
			err := convertErr(t, openStore(t, in.ref("v1"), nil), openStore(t, out.ref("v1"), nil), nil, l.desc.Digest.String())
			if i == 0 && !errors.Is(err, errdefs.ErrDataLoss) {
				t.Errorf("plain tar layer: %v, want data loss", err)
			}
			if !strings.Contains(err.Error(), "match") {
				t.Errorf("layer %d: error %q does not say the content does not match", i+1, err)
			}
			notTagged(t, layoutView{out, "v1"})
		}
	})

	t.Run("corrupted-config", func(t *testing.T) {
		t.Parallel()
		in, out := newLayout(t), &layout{dir: t.TempDir()}
		in.putImage(t, a, "v1")
		p := in.path(a.cfgDesc.Digest)
		os.WriteFile(p, []byte(strings.Replace(string(a.config), "lazypull tests", "lazypull tezts", 1)), 0o644)
		convertErr(t, openStore(t, in.ref("v1"), nil), openStore(t, out.ref("v1"), nil), errdefs.ErrDataLoss, a.cfgDesc.Digest.String())
		notTagged(t, layoutView{out, "v1"})
	})

	t.Run("missing-blob", func(t *testing.T) {
		t.Parallel()
		in, out := newLayout(t), &layout{dir: t.TempDir()}
		in.putImage(t, b, "v1")
		os.Remove(in.path(b.layers[1].desc.Digest))
		convertErr(t, openStore(t, in.ref("v1"), nil), openStore(t, out.ref("v1"), nil), errdefs.ErrNotFound, b.layers[1].desc.Digest.String())
		notTagged(t, layoutView{out, "v1"})
	})

	t.Run("bad-reference", func(t *testing.T) {
		t.Parallel()
		if _, err := convert.OpenStore(convert.LayoutPrefix, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("OpenStore(%q) = %v, want invalid argument", convert.LayoutPrefix, err)
		}
		if _, err := convert.OpenStore(convert.LayoutPrefix+":v1", nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("OpenStore(%q) = %v, want invalid argument", convert.LayoutPrefix+":v1", err)
		}
	})
}
