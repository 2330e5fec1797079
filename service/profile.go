// Learned start-up profiles: recorded per image while its layers serve a
// start-up, saved under [profile] dir and (push = true) pushed to the
// image's repository as a referrer of its manifest; looked up at the first
// mount of an image and handed to its layers as hints (fs.Layer.Hint).
// See docs/profiles.md.

package service

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/profile"
	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/snapshot"
)

// LabelManifestDigest is the label containerd's image handler
// (pkg/snapshotters.AppendInfoHandlerWrapper, CRI) sets to the digest of
// the image manifest a layer belongs to.
const LabelManifestDigest = "containerd.io/snapshot/cri.manifest-digest"

// Recording and lookup bounds.
const (
	// profileQuiet ends a recording: this long without a new first read.
	profileQuiet = 5 * time.Second
	// profileMaxRecording ends a recording this long after its first read.
	profileMaxRecording = 2 * time.Minute
	// profileMaxIdle drops a recording that saw no read this long after
	// the image's first mount (an image pulled but not run).
	profileMaxIdle = 30 * time.Minute
	// maxProfileImages bounds the images tracked at once.
	maxProfileImages = 256
	// profileLookupTimeout bounds a registry lookup.
	profileLookupTimeout = time.Minute
	// profileRecheck is how long a registry's "no profile" answer for an
	// image is believed.
	profileRecheck = time.Hour
	// profileCandidates is how many referrers, newest first, a lookup
	// tries before giving up.
	profileCandidates = 3
)

// profiles records and looks up the start-up profiles of the images whose
// layers the daemon mounts. It implements fs.Recorder and
// fs.ImageRecorder (the chunk reads of every layer).
type profiles struct {
	cfg ProfileConfig
	dir string
	reg *remote.Registry
	// mounted lists the layers mounted now (the manager's), to hint the
	// layers an image shares with images mounted before it.
	mountedLayers func() []*lfs.Layer

	// quiet, maxRec, maxIdle and tick are the recording bounds (fields so
	// tests can shorten them).
	quiet, maxRec, maxIdle, tick time.Duration

	ctx    context.Context // canceled by close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	images  map[digest.Digest]*imageProfile   // by manifest digest
	byLayer map[digest.Digest][]*imageProfile // recording images by layer digest
	mounts  map[string]mountedLayer           // by mountpoint
}

type mountedLayer struct {
	image *imageProfile
	layer *lfs.Layer
}

// imageProfile is one image's recording and looked-up profile.
type imageProfile struct {
	manifest digest.Digest
	ref      string

	// Under profiles.mu:
	layers    map[digest.Digest][]*lfs.Layer // layers mounted for this image
	all       map[digest.Digest]bool         // every layer of the image (the image-layers label)
	found     *profile.Profile               // looked up; nil until then or if none
	source    string                         // where found came from
	lookedUp  bool                           // the lookup is over
	hinted    map[*lfs.Layer]bool
	recording bool
	mounted   time.Time // first mount
	first     time.Time // first read (zero: none yet)
	last      time.Time // latest first read of a chunk
	chunks    map[digest.Digest][]recordedChunk
	nchunks   int
}

type recordedChunk struct {
	off int64
	ms  int64
}

func newProfiles(cfg ProfileConfig, dir string, reg *remote.Registry, mountedLayers func() []*lfs.Layer) (*profiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating the profile directory: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &profiles{
		cfg: cfg, dir: dir, reg: reg, mountedLayers: mountedLayers,
		quiet: profileQuiet, maxRec: profileMaxRecording, maxIdle: profileMaxIdle, tick: time.Second,
		ctx: ctx, cancel: cancel,
		images: map[digest.Digest]*imageProfile{}, byLayer: map[digest.Digest][]*imageProfile{}, mounts: map[string]mountedLayer{},
	}, nil
}

// mounted is told about every layer mounted lazily, with its labels. It
// never blocks on the network: the lookup runs in the background.
func (p *profiles) mounted(ctx context.Context, mountpoint string, labels map[string]string, src lfs.LayerSource, l *lfs.Layer) {
	if p == nil || l == nil {
		return
	}
	m, err := digest.Parse(labels[LabelManifestDigest])
	if err != nil {
		// Without the label (a client that does not set it, e.g. CRI
		// of containerd 1.6), the image's manifest is resolved from its
		// reference in the background.
		m = ""
	}
	key := m
	if key == "" {
		key = digest.Digest("ref:" + src.Ref)
	}
	// The image's other layers, some perhaps mounted for other images
	// before (containerd prepares only the layers it does not have).
	all := map[digest.Digest]bool{src.Digest: true}
	for _, s := range strings.Split(labels[snapshot.LabelCRIImageLayers], ",") {
		if d, err := digest.Parse(strings.TrimSpace(s)); err == nil && len(all) < profile.MaxLayers {
			all[d] = true
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	img := p.images[key]
	if img == nil {
		if len(p.images) >= maxProfileImages {
			p.dropOldestLocked()
		}
		img = &imageProfile{
			manifest: m, ref: src.Ref, layers: map[digest.Digest][]*lfs.Layer{}, all: map[digest.Digest]bool{},
			hinted: map[*lfs.Layer]bool{}, mounted: time.Now(), chunks: map[digest.Digest][]recordedChunk{}, recording: p.cfg.Record,
		}
		p.images[key] = img
		p.wg.Add(1)
		go p.run(context.WithoutCancel(ctx), img)
	}
	img.layers[src.Digest] = append(img.layers[src.Digest], l)
	p.mounts[mountpoint] = mountedLayer{image: img, layer: l}
	for d := range all {
		if len(img.all) >= profile.MaxLayers {
			break
		}
		img.all[d] = true
		if img.recording && !slices.Contains(p.byLayer[d], img) {
			p.byLayer[d] = append(p.byLayer[d], img)
		}
	}
	if img.found != nil {
		p.hintLocked(img, src.Digest, l)
	}
}

// unmounted forgets the layer at mountpoint.
func (p *profiles) unmounted(mountpoint string) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	ml, ok := p.mounts[mountpoint]
	if !ok {
		return
	}
	delete(p.mounts, mountpoint)
	d := ml.layer.Digest()
	ml.image.layers[d] = slices.DeleteFunc(ml.image.layers[d], func(l *lfs.Layer) bool { return l == ml.layer })
	delete(ml.image.hinted, ml.layer)
}

// dropOldestLocked forgets the image mounted first, to bound the map.
func (p *profiles) dropOldestLocked() {
	var oldest digest.Digest
	var at time.Time
	for k, img := range p.images {
		if oldest == "" || img.mounted.Before(at) {
			oldest, at = k, img.mounted
		}
	}
	if img := p.images[oldest]; img != nil {
		p.stopRecordingLocked(img)
		delete(p.images, oldest)
	}
}

// FirstRead implements fs.Recorder; profiles are chunk-granular.
func (p *profiles) FirstRead(digest.Digest, string) {}

// ChunkRead implements fs.Recorder: the first read of chunk c of a layer,
// noted for every image recording that layer.
func (p *profiles) ChunkRead(layer digest.Digest, c estargz.Chunk) {
	p.mu.Lock()
	defer p.mu.Unlock()
	imgs := p.byLayer[layer]
	if len(imgs) == 0 {
		return
	}
	now := time.Now()
	for _, img := range imgs {
		if img.nchunks >= profile.MaxChunks || len(img.chunks[layer]) >= profile.MaxChunksPerLayer {
			continue
		}
		if img.first.IsZero() {
			img.first = now
		}
		img.last = now
		img.nchunks++
		img.chunks[layer] = append(img.chunks[layer], recordedChunk{off: c.Offset, ms: now.Sub(img.first).Milliseconds()})
	}
}

// imageRecorder adapts profiles to an fs.ImageRecorder, beside another.
type imageRecorder struct {
	p    *profiles
	also lfs.ImageRecorder
}

func (r imageRecorder) FirstRead(ref string, layer digest.Digest, name string) {
	r.also.FirstRead(ref, layer, name)
}

func (r imageRecorder) ChunkRead(ref string, layer digest.Digest, c estargz.Chunk) {
	r.also.ChunkRead(ref, layer, c)
	r.p.ChunkRead(layer, c)
}

// run looks the image's profile up, then watches its recording until it
// ends and saves (and pushes) it.
func (p *profiles) run(ctx context.Context, img *imageProfile) {
	defer p.wg.Done()
	ctx = log.WithLogger(p.ctx, log.G(ctx).WithField("image", img.ref))
	if img.manifest == "" {
		m, err := p.resolve(ctx, img)
		if err != nil {
			log.G(ctx).WithError(err).Debug("no manifest digest for the start-up profile")
			p.mu.Lock()
			p.stopRecordingLocked(img)
			p.mu.Unlock()
			return
		}
		p.mu.Lock()
		img.manifest = m
		p.mu.Unlock()
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("manifest", img.manifest))
	if p.cfg.Lookup {
		p.lookup(ctx, img)
	}
	p.mu.Lock()
	img.lookedUp = true
	p.mu.Unlock()
	p.watch(ctx, img)
}

// resolve finds the manifest digest of an image mounted without the
// manifest label, from its reference; the manifest must list one of the
// layers mounted for it.
func (p *profiles) resolve(ctx context.Context, img *imageProfile) (digest.Digest, error) {
	if p.reg == nil {
		return "", errors.New("no registry")
	}
	rctx, cancel := context.WithTimeout(ctx, profileLookupTimeout)
	defer cancel()
	ri, err := p.reg.Resolve(rctx, img.ref, nil)
	if err != nil {
		return "", fmt.Errorf("resolving %s: %w", img.ref, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range ri.Manifest.Layers {
		if len(img.layers[l.Digest]) > 0 {
			return ri.ManifestDesc.Digest, nil
		}
	}
	return "", fmt.Errorf("%s now names a manifest without the layers mounted for it", img.ref)
}

// lookup finds the image's profile, locally or in the registry, and hints
// the layers mounted so far.
func (p *profiles) lookup(ctx context.Context, img *imageProfile) {
	prof, source, err := LoadProfile(p.dir, img.manifest)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.G(ctx).WithError(err).Warn("ignoring the saved start-up profile")
	}
	if prof == nil && p.reg != nil && !p.askedRecently(img.manifest) {
		lctx, cancel := context.WithTimeout(ctx, profileLookupTimeout)
		prof, source, err = FetchProfile(lctx, p.reg, img.ref, img.manifest)
		cancel()
		switch {
		case err != nil:
			log.G(ctx).WithError(err).Info("no start-up profile from the registry")
		case prof == nil:
			log.G(ctx).Debug("no start-up profile in the registry")
		}
		if prof != nil {
			// Kept, so that remounts (a restart) need no registry.
			prof.Image = img.manifest
			if _, err := SaveProfile(p.dir, prof); err != nil {
				log.G(ctx).WithError(err).Warn("saving the start-up profile found in the registry failed")
			}
		} else if err == nil {
			p.noteAsked(img.manifest)
		}
	}
	if prof == nil {
		return
	}
	var others []*lfs.Layer
	if p.mountedLayers != nil {
		others = p.mountedLayers()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	img.found, img.source = prof, source
	n := 0
	for d, ls := range img.layers {
		for _, l := range ls {
			n += p.hintLocked(img, d, l)
		}
	}
	// Layers of the image mounted for other images before it.
	for _, l := range others {
		if img.all[l.Digest()] {
			n += p.hintLocked(img, l.Digest(), l)
		}
	}
	// offsets: what was handed to the layers mounted so far (each takes
	// the ones that start one of its chunks).
	log.G(ctx).WithFields(log.Fields{"source": source, "runs": prof.Runs, "chunks": prof.ChunkCount(), "offsets": n}).Info("start-up profile found")
}

// askedRecently reports whether the registry said, less than
// profileRecheck ago, that manifest m has no profile: the image's remounts
// after a restart, and its next cold starts on this node for a while, do
// not ask again.
func (p *profiles) askedRecently(m digest.Digest) bool {
	fi, err := os.Stat(noneMarker(p.dir, m))
	return err == nil && time.Since(fi.ModTime()) < profileRecheck
}

func (p *profiles) noteAsked(m digest.Digest) {
	if err := os.WriteFile(noneMarker(p.dir, m), nil, 0o600); err != nil {
		log.G(p.ctx).WithError(err).Debug("noting a profile lookup failed")
	}
}

// noneMarker is the file noting that the registry has no profile of m.
func noneMarker(dir string, m digest.Digest) string {
	return filepath.Join(dir, m.Algorithm().String()+"-"+m.Encoded()+".none")
}

// hintLocked hands layer l the profile's chunk offsets for it, once; it
// returns how many it passed.
func (p *profiles) hintLocked(img *imageProfile, d digest.Digest, l *lfs.Layer) int {
	if img.hinted[l] {
		return 0
	}
	img.hinted[l] = true
	pl := img.found.Layer(d)
	if pl == nil || len(pl.Chunks) == 0 {
		return 0
	}
	l.Hint(p.ctx, pl.Chunks)
	return len(pl.Chunks)
}

// watch waits for the recording to end (quiet, too long, never read, or
// the service closing) and saves it.
func (p *profiles) watch(ctx context.Context, img *imageProfile) {
	t := time.NewTicker(p.tick)
	defer t.Stop()
	for {
		closing := false
		select {
		case <-p.ctx.Done():
			closing = true
		case <-t.C:
		}
		p.mu.Lock()
		if !img.recording {
			p.mu.Unlock()
			return
		}
		now := time.Now()
		done := closing
		switch {
		case img.first.IsZero():
			if closing || now.Sub(img.mounted) >= p.maxIdle {
				p.stopRecordingLocked(img)
				p.mu.Unlock()
				return
			}
		case now.Sub(img.last) >= p.quiet, now.Sub(img.first) >= p.maxRec:
			done = true
		}
		if !done {
			p.mu.Unlock()
			continue
		}
		rec := img.recordedLocked()
		p.stopRecordingLocked(img)
		found := img.found
		p.mu.Unlock()
		p.finish(ctx, img, rec, found, !closing)
		return
	}
}

// stopRecordingLocked stops noting reads for img.
func (p *profiles) stopRecordingLocked(img *imageProfile) {
	img.recording = false
	for d, imgs := range p.byLayer {
		imgs = slices.DeleteFunc(imgs, func(x *imageProfile) bool { return x == img })
		if len(imgs) == 0 {
			delete(p.byLayer, d)
		} else {
			p.byLayer[d] = imgs
		}
	}
}

// recordedLocked is the recording as a profile of one run.
func (img *imageProfile) recordedLocked() *profile.Profile {
	rec := &profile.Profile{Version: profile.Version, Image: img.manifest, Runs: 1}
	for d, cs := range img.chunks {
		l := profile.Layer{Digest: d}
		seen := map[int64]bool{}
		for _, c := range cs {
			if seen[c.off] {
				continue // the same chunk content twice in a layer
			}
			seen[c.off] = true
			l.Chunks = append(l.Chunks, c.off)
			l.Times = append(l.Times, min(c.ms, profile.MaxTime))
		}
		rec.Layers = append(rec.Layers, l)
	}
	slices.SortFunc(rec.Layers, func(a, b profile.Layer) int { return cmp.Compare(a.Digest, b.Digest) })
	if len(rec.Layers) > profile.MaxLayers {
		rec.Layers = rec.Layers[:profile.MaxLayers]
	}
	return rec
}

// finish merges a recording with the profile saved before (or the one
// found in the registry), saves it, and pushes it if configured.
func (p *profiles) finish(ctx context.Context, img *imageProfile, rec, found *profile.Profile, push bool) {
	if rec.ChunkCount() == 0 {
		return
	}
	base, _, err := LoadProfile(p.dir, img.manifest)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.G(ctx).WithError(err).Warn("replacing an unreadable saved start-up profile")
	}
	if base == nil {
		base = found
	}
	merged := profile.Merge(base, rec)
	merged.Image = img.manifest
	path, err := SaveProfile(p.dir, merged)
	if err != nil {
		log.G(ctx).WithError(err).Warn("saving the start-up profile failed")
		return
	}
	log.G(ctx).WithFields(log.Fields{"path": path, "runs": merged.Runs, "chunks": rec.ChunkCount()}).Info("start-up profile recorded")
	if !push || !p.cfg.Push || p.reg == nil {
		return
	}
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), profileLookupTimeout)
	defer cancel()
	desc, err := PushProfile(pctx, p.reg, img.ref, merged)
	if err != nil {
		log.G(ctx).WithError(err).Warn("pushing the start-up profile failed")
		return
	}
	log.G(ctx).WithField("artifact", desc.Digest).Info("start-up profile pushed")
}

// close ends the recordings in progress (saving them, without pushing)
// and stops the lookups and hinted fetches.
func (p *profiles) close() {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.cancel()
	p.wg.Wait()
}

// ProfilePath is where a profile of the image with manifest m is kept in dir.
func ProfilePath(dir string, m digest.Digest) string {
	return filepath.Join(dir, m.Algorithm().String()+"-"+m.Encoded()+".json")
}

// LoadProfile reads the profile saved in dir for manifest m; the error
// matches fs.ErrNotExist when there is none. It returns the file's path.
func LoadProfile(dir string, m digest.Digest) (*profile.Profile, string, error) {
	if m.Validate() != nil {
		return nil, "", fmt.Errorf("manifest digest %q: %w", m, errdefs.ErrInvalidArgument)
	}
	path := ProfilePath(dir, m)
	f, err := os.Open(path)
	if err != nil {
		return nil, "", err
	}
	defer f.Close()
	p, err := profile.Decode(f)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", path, err)
	}
	if p.Image != "" && p.Image != m {
		return nil, "", fmt.Errorf("%s is a profile of %s: %w", path, p.Image, profile.ErrInvalid)
	}
	return p, path, nil
}

// SaveProfile writes p (which must name its image) into dir and returns
// the path.
func SaveProfile(dir string, p *profile.Profile) (string, error) {
	if p.Image.Validate() != nil {
		return "", fmt.Errorf("profile without an image digest: %w", errdefs.ErrInvalidArgument)
	}
	b, err := p.Marshal()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("creating %s: %w", dir, err)
	}
	path := ProfilePath(dir, p.Image)
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return "", fmt.Errorf("saving the profile: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return "", fmt.Errorf("saving the profile: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("saving the profile: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return "", fmt.Errorf("saving the profile: %w", err)
	}
	return path, nil
}

// PushProfile pushes p into the repository of ref as an artifact whose
// subject is the image manifest p.Image (docs/profiles.md).
func PushProfile(ctx context.Context, reg *remote.Registry, ref string, p *profile.Profile) (ocispec.Descriptor, error) {
	if p.Image.Validate() != nil {
		return ocispec.Descriptor{}, fmt.Errorf("profile without an image digest: %w", errdefs.ErrInvalidArgument)
	}
	b, err := p.Marshal()
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	// The subject descriptor needs the manifest's size and media type.
	subject, _, err := reg.FetchIndexOrManifest(ctx, repoRef(ref)+"@"+p.Image.String())
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("fetching the image manifest %s: %w", p.Image, err)
	}
	return reg.PushReferrer(ctx, ref, remote.Artifact{
		ArtifactType: profile.ArtifactType,
		MediaType:    profile.MediaType,
		Data:         b,
		Subject:      subject,
		Annotations:  map[string]string{profile.AnnotationRuns: strconv.Itoa(p.Runs)},
	})
}

// FetchProfile finds the profile of the image manifest m among its
// referrers in the repository of ref: the newest (by creation annotation)
// that is valid, of at most profileCandidates tried. None is (nil, "", nil).
func FetchProfile(ctx context.Context, reg *remote.Registry, ref string, m digest.Digest) (*profile.Profile, string, error) {
	refs, err := reg.Referrers(ctx, ref, m, profile.ArtifactType)
	if err != nil {
		return nil, "", fmt.Errorf("listing the referrers of %s: %w", m, err)
	}
	// Newest first; entries without a readable time last, in list order.
	created := func(d ocispec.Descriptor) time.Time {
		t, _ := time.Parse(time.RFC3339Nano, d.Annotations[ocispec.AnnotationCreated])
		return t
	}
	slices.SortStableFunc(refs, func(a, b ocispec.Descriptor) int { return created(b).Compare(created(a)) })
	var errs []error
	for i, d := range refs {
		if i == profileCandidates {
			break
		}
		b, err := reg.FetchArtifact(ctx, ref, d, profile.ArtifactType, profile.MediaType, profile.MaxEncodedSize)
		if err != nil {
			err = fmt.Errorf("profile %s: %w", d.Digest, err)
			log.G(ctx).WithError(err).Warn("refusing a start-up profile found in the registry")
			errs = append(errs, err)
			continue
		}
		p, err := profile.Unmarshal(b)
		if err == nil && p.Image != "" && p.Image != m {
			err = fmt.Errorf("a profile of %s: %w", p.Image, profile.ErrInvalid)
		}
		if err != nil {
			err = fmt.Errorf("profile %s: %w", d.Digest, err)
			log.G(ctx).WithError(err).Warn("refusing a start-up profile found in the registry")
			errs = append(errs, err)
			continue
		}
		return p, repoRef(ref) + "@" + d.Digest.String(), nil
	}
	return nil, "", errors.Join(errs...)
}

// repoRef is ref without its tag or digest.
func repoRef(ref string) string {
	if i := strings.IndexByte(ref, '@'); i >= 0 {
		ref = ref[:i]
	}
	if i := strings.LastIndexByte(ref, ':'); i > strings.LastIndexByte(ref, '/') {
		ref = ref[:i]
	}
	return ref
}
