package convert

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/remote"
)

// Store is where images are read from and written to: a registry
// repository or an OCI image layout directory.
type Store interface {
	// Root returns the descriptor and bytes of the image's top-level
	// manifest or index.
	Root(ctx context.Context) (ocispec.Descriptor, []byte, error)
	// Fetch streams a blob or manifest by descriptor.
	Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error)
	// Exists reports whether the store has a blob already.
	Exists(ctx context.Context, desc ocispec.Descriptor) (bool, error)
	// Push stores a blob (a no-op when it exists).
	Push(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error
	// PushManifest stores a manifest or index; tag it when tag is true.
	PushManifest(ctx context.Context, desc ocispec.Descriptor, raw []byte, tag bool) error
	// String names the store for messages.
	String() string
}

// LayoutPrefix marks an OCI image layout reference: oci-layout:DIR[:TAG].
const LayoutPrefix = "oci-layout:"

// OpenStore returns the store a reference names: "oci-layout:DIR[:TAG]"
// for an OCI image layout, anything else is a registry reference.
func OpenStore(ref string, reg *remote.Registry) (Store, error) {
	if rest, ok := strings.CutPrefix(ref, LayoutPrefix); ok {
		dir, tag := rest, ""
		if i := strings.LastIndex(rest, ":"); i >= 0 && !strings.Contains(rest[i+1:], "/") {
			dir, tag = rest[:i], rest[i+1:]
		}
		if dir == "" {
			return nil, fmt.Errorf("%q: %w: oci-layout reference needs a directory", ref, errdefs.ErrInvalidArgument)
		}
		return &layoutStore{dir: dir, tag: tag}, nil
	}
	if reg == nil {
		return nil, fmt.Errorf("%q: no registry client", ref)
	}
	return &registryStore{ref: ref, reg: reg}, nil
}

type registryStore struct {
	ref string
	reg *remote.Registry
}

func (s *registryStore) String() string { return s.ref }

func (s *registryStore) Root(ctx context.Context) (ocispec.Descriptor, []byte, error) {
	return s.reg.FetchIndexOrManifest(ctx, s.ref)
}

func (s *registryStore) Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	return s.reg.Fetch(ctx, s.ref, desc)
}

func (s *registryStore) Exists(ctx context.Context, desc ocispec.Descriptor) (bool, error) {
	return s.reg.BlobExists(ctx, s.ref, desc)
}

func (s *registryStore) Push(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error {
	return s.reg.PushBlob(ctx, s.ref, desc, r)
}

func (s *registryStore) PushManifest(ctx context.Context, desc ocispec.Descriptor, raw []byte, tag bool) error {
	ref := s.ref
	if !tag {
		// Children of an index are pushed by digest.
		ref = repoOf(s.ref) + "@" + desc.Digest.String()
	}
	return s.reg.PushManifest(ctx, ref, desc, raw)
}

// repoOf strips the tag or digest from a reference.
func repoOf(ref string) string {
	if i := strings.Index(ref, "@"); i >= 0 {
		ref = ref[:i]
	}
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		ref = ref[:i]
	}
	return ref
}

// layoutStore is an OCI image layout directory (image-spec image-layout.md).
type layoutStore struct {
	dir string
	tag string
	mu  sync.Mutex
}

func (s *layoutStore) String() string {
	if s.tag == "" {
		return LayoutPrefix + s.dir
	}
	return LayoutPrefix + s.dir + ":" + s.tag
}

func (s *layoutStore) blobPath(d digest.Digest) (string, error) {
	if err := d.Validate(); err != nil {
		return "", fmt.Errorf("%w: %w", errdefs.ErrInvalidArgument, err)
	}
	return filepath.Join(s.dir, "blobs", d.Algorithm().String(), d.Encoded()), nil
}

func (s *layoutStore) readIndex() (*ocispec.Index, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, ocispec.ImageIndexFile))
	if errors.Is(err, os.ErrNotExist) {
		return &ocispec.Index{Versioned: specsVersioned(), MediaType: ocispec.MediaTypeImageIndex}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading OCI layout index: %w", err)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, fmt.Errorf("parsing %s: %w", filepath.Join(s.dir, ocispec.ImageIndexFile), err)
	}
	return &idx, nil
}

func (s *layoutStore) Root(ctx context.Context) (ocispec.Descriptor, []byte, error) {
	idx, err := s.readIndex()
	if err != nil {
		return ocispec.Descriptor{}, nil, err
	}
	var found []ocispec.Descriptor
	for _, m := range idx.Manifests {
		name := m.Annotations[ocispec.AnnotationRefName]
		if s.tag == "" || name == s.tag {
			found = append(found, m)
		}
	}
	switch {
	case len(found) == 0:
		return ocispec.Descriptor{}, nil, fmt.Errorf("%s: %w: no manifest tagged %q", s, errdefs.ErrNotFound, s.tag)
	case len(found) > 1:
		return ocispec.Descriptor{}, nil, fmt.Errorf("%s: %d manifests match; name one with :TAG", s, len(found))
	}
	rc, err := s.Fetch(ctx, found[0])
	if err != nil {
		return ocispec.Descriptor{}, nil, err
	}
	defer rc.Close()
	raw, err := io.ReadAll(io.LimitReader(rc, 4<<20))
	if err != nil {
		return ocispec.Descriptor{}, nil, err
	}
	if digest.FromBytes(raw) != found[0].Digest {
		return ocispec.Descriptor{}, nil, fmt.Errorf("%s: manifest %s does not match its digest", s, found[0].Digest)
	}
	return found[0], raw, nil
}

func (s *layoutStore) Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	p, err := s.blobPath(desc.Digest)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: blob %s: %w", s, desc.Digest, errdefs.ErrNotFound)
	}
	return f, err
}

func (s *layoutStore) Exists(ctx context.Context, desc ocispec.Descriptor) (bool, error) {
	p, err := s.blobPath(desc.Digest)
	if err != nil {
		return false, err
	}
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return err == nil && fi.Size() == desc.Size, err
}

func (s *layoutStore) Push(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error {
	if ok, err := s.Exists(ctx, desc); err != nil || ok {
		return err
	}
	p, _ := s.blobPath(desc.Digest)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(s.dir, ocispec.ImageLayoutFile), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	v := desc.Digest.Verifier()
	n, err := io.Copy(io.MultiWriter(tmp, v), r)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("%s: writing blob %s: %w", s, desc.Digest, err)
	}
	if n != desc.Size || !v.Verified() {
		return fmt.Errorf("%s: blob %s: %w: got %d bytes that do not match", s, desc.Digest, errdefs.ErrFailedPrecondition, n)
	}
	return os.Rename(tmp.Name(), p)
}

func (s *layoutStore) PushManifest(ctx context.Context, desc ocispec.Descriptor, raw []byte, tag bool) error {
	if err := s.Push(ctx, desc, strings.NewReader(string(raw))); err != nil {
		return err
	}
	if !tag {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	idx, err := s.readIndex()
	if err != nil {
		return err
	}
	entry := desc
	entry.Annotations = map[string]string{}
	for k, v := range desc.Annotations {
		entry.Annotations[k] = v
	}
	if s.tag != "" {
		entry.Annotations[ocispec.AnnotationRefName] = s.tag
	}
	kept := idx.Manifests[:0]
	for _, m := range idx.Manifests {
		if m.Annotations[ocispec.AnnotationRefName] != s.tag {
			kept = append(kept, m)
		}
	}
	idx.Manifests = append(kept, entry)
	idx.SchemaVersion = 2
	b, err := json.Marshal(idx)
	if err != nil {
		return err
	}
	tmp := filepath.Join(s.dir, ocispec.ImageIndexFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(s.dir, ocispec.ImageIndexFile))
}
