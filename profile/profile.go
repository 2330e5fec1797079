// Package profile is the format of learned start-up profiles: for each
// layer of an image, the chunks its start-up read, in the order it first
// read them. A profile recorded on one node lets every later cold start of
// the image, on any node, fetch those chunks ahead of the workload
// (fs.Layer.Hint), in that order.
//
// A profile is JSON (see docs/profiles.md):
//
//	{
//	  "version": 1,
//	  "image": "sha256:...",          // the image manifest it was recorded for
//	  "runs": 3,                      // recordings merged into it
//	  "layers": [
//	    {"digest": "sha256:...",      // layer blob digest
//	     "chunks": [1234, 0, 98765],  // compressed blob offsets of chunks, first-read order
//	     "times": [0, 3, 250],        // optional: ms from the recording's first read
//	     "counts": [3, 3, 1]}         // optional: runs that read the chunk
//	  ]
//	}
//
// Profiles found in a registry are untrusted: Decode bounds their size and
// Validate checks their structure. A profile only orders fetches: a chunk
// offset that names no chunk of the layer is ignored by the layer, and a
// layer the image does not have is never hinted.
package profile

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"time"

	"github.com/opencontainers/go-digest"
)

// Media types of the profile artifact (docs/profiles.md).
const (
	// ArtifactType is the artifactType of a profile's image manifest.
	ArtifactType = "application/vnd.lazypull.profile.v1+json"
	// MediaType is the media type of the manifest's one layer, the
	// profile JSON.
	MediaType = "application/vnd.lazypull.profile.v1+json"
	// AnnotationRuns on the manifest says how many recordings the
	// profile merges (informative; the JSON is authoritative).
	AnnotationRuns = "io.lazypull.profile.runs"
)

// Version is the format version this package reads and writes.
const Version = 1

// Bounds of a profile, so that one found in a registry cannot make the
// daemon hold or queue more than these.
const (
	// MaxEncodedSize bounds a profile's JSON.
	MaxEncodedSize = 4 << 20
	// MaxLayers bounds how many layers a profile describes.
	MaxLayers = 256
	// MaxChunksPerLayer bounds one layer's chunk list; it equals
	// fs.MaxHintChunks, what one Layer.Hint call takes.
	MaxChunksPerLayer = 1 << 16
	// MaxChunks bounds the chunks of all layers together.
	MaxChunks = 1 << 17
	// MaxRuns bounds the run count (merging stops counting there).
	MaxRuns = 1 << 20
	// MaxTime bounds a first-read time, in milliseconds (one day).
	MaxTime = int64(24 * time.Hour / time.Millisecond)
)

// Profile is a learned start-up profile of one image.
type Profile struct {
	// Version is the format version, Version.
	Version int `json:"version"`
	// Image is the digest of the image manifest the profile was recorded
	// for (the artifact's subject). Optional in the JSON.
	Image digest.Digest `json:"image,omitempty"`
	// Runs is how many recordings were merged into the profile (>= 1).
	Runs int `json:"runs"`
	// Layers are the layers that served reads during start-up, each at
	// most once.
	Layers []Layer `json:"layers"`
}

// Layer is one layer's part of a profile.
type Layer struct {
	// Digest is the layer blob's digest.
	Digest digest.Digest `json:"digest"`
	// Chunks are the compressed offsets in the blob of the chunks read
	// during start-up (the chunk's gzip member or zstd frame), in the
	// order they were first read, without repeats.
	Chunks []int64 `json:"chunks"`
	// Times, when set, holds for each chunk the milliseconds from the
	// recording's first read to the chunk's first read (for a merged
	// profile, the mean over the runs that recorded times).
	Times []int64 `json:"times,omitempty"`
	// Counts, when set, holds for each chunk how many of the Runs read
	// it; missing means every run did.
	Counts []int `json:"counts,omitempty"`
}

// Error is a profile that does not parse or breaks a bound or rule.
type Error struct {
	Msg string
}

func (e *Error) Error() string { return "invalid profile: " + e.Msg }

func errorf(format string, args ...any) error {
	return &Error{Msg: fmt.Sprintf(format, args...)}
}

// ErrInvalid matches every *Error with errors.Is.
var ErrInvalid = errors.New("invalid profile")

// Is makes errors.Is(err, ErrInvalid) hold for an *Error.
func (e *Error) Is(target error) bool { return target == ErrInvalid }

// Decode reads a profile from untrusted JSON, at most MaxEncodedSize
// bytes, and validates it.
func Decode(r io.Reader) (*Profile, error) {
	b, err := io.ReadAll(io.LimitReader(r, MaxEncodedSize+1))
	if err != nil {
		return nil, fmt.Errorf("reading profile: %w", err)
	}
	return Unmarshal(b)
}

// Unmarshal parses and validates a profile from untrusted JSON.
func Unmarshal(b []byte) (*Profile, error) {
	if len(b) > MaxEncodedSize {
		return nil, errorf("larger than %d bytes", MaxEncodedSize)
	}
	// The version first: a later format may not look like this one.
	var head struct {
		Version *int `json:"version"`
	}
	if err := json.Unmarshal(b, &head); err != nil {
		return nil, errorf("%v", err)
	}
	if head.Version == nil {
		return nil, errorf("no version")
	}
	if *head.Version != Version {
		return nil, errorf("version %d, this reader knows %d", *head.Version, Version)
	}
	var p Profile
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&p); err != nil {
		return nil, errorf("%v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errorf("data after the profile")
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return &p, nil
}

// Validate checks the profile's structure and bounds: the version, the
// digests, at most MaxLayers layers each named once, at most
// MaxChunksPerLayer chunks per layer and MaxChunks in all, offsets >= 0
// without repeats, Times and Counts as long as Chunks when set and in
// range.
func (p *Profile) Validate() error {
	if p.Version != Version {
		return errorf("version %d, this reader knows %d", p.Version, Version)
	}
	if p.Image != "" {
		if err := p.Image.Validate(); err != nil {
			return errorf("image digest %q: %v", p.Image, err)
		}
	}
	if p.Runs < 1 || p.Runs > MaxRuns {
		return errorf("runs %d out of [1, %d]", p.Runs, MaxRuns)
	}
	if len(p.Layers) > MaxLayers {
		return errorf("%d layers, more than %d", len(p.Layers), MaxLayers)
	}
	seen := make(map[digest.Digest]bool, len(p.Layers))
	total := 0
	for i := range p.Layers {
		l := &p.Layers[i]
		if err := l.Digest.Validate(); err != nil {
			return errorf("layer %d: digest %q: %v", i, l.Digest, err)
		}
		if seen[l.Digest] {
			return errorf("layer %s listed twice", l.Digest)
		}
		seen[l.Digest] = true
		if len(l.Chunks) > MaxChunksPerLayer {
			return errorf("layer %s: %d chunks, more than %d", l.Digest, len(l.Chunks), MaxChunksPerLayer)
		}
		if total += len(l.Chunks); total > MaxChunks {
			return errorf("more than %d chunks in all", MaxChunks)
		}
		offs := make(map[int64]bool, len(l.Chunks))
		for _, off := range l.Chunks {
			if off < 0 {
				return errorf("layer %s: negative chunk offset %d", l.Digest, off)
			}
			if offs[off] {
				return errorf("layer %s: chunk offset %d listed twice", l.Digest, off)
			}
			offs[off] = true
		}
		if l.Times != nil && len(l.Times) != len(l.Chunks) {
			return errorf("layer %s: %d times for %d chunks", l.Digest, len(l.Times), len(l.Chunks))
		}
		for _, t := range l.Times {
			if t < 0 || t > MaxTime {
				return errorf("layer %s: time %d out of [0, %d]", l.Digest, t, MaxTime)
			}
		}
		if l.Counts != nil && len(l.Counts) != len(l.Chunks) {
			return errorf("layer %s: %d counts for %d chunks", l.Digest, len(l.Counts), len(l.Chunks))
		}
		for _, c := range l.Counts {
			if c < 1 || c > p.Runs {
				return errorf("layer %s: count %d out of [1, %d]", l.Digest, c, p.Runs)
			}
		}
	}
	return nil
}

// Marshal encodes a valid profile; it fails if the profile is invalid or
// its encoding exceeds MaxEncodedSize.
func (p *Profile) Marshal() ([]byte, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("encoding profile: %w", err)
	}
	if len(b) > MaxEncodedSize {
		return nil, errorf("encodes to %d bytes, more than %d", len(b), MaxEncodedSize)
	}
	return b, nil
}

// Layer returns the part of the profile for layer d, or nil.
func (p *Profile) Layer(d digest.Digest) *Layer {
	for i := range p.Layers {
		if p.Layers[i].Digest == d {
			return &p.Layers[i]
		}
	}
	return nil
}

// ChunkCount is the number of chunks of all layers.
func (p *Profile) ChunkCount() int {
	n := 0
	for _, l := range p.Layers {
		n += len(l.Chunks)
	}
	return n
}

// count is how many runs read chunk i of l.
func (l *Layer) count(i, runs int) int {
	if l.Counts != nil {
		return l.Counts[i]
	}
	return runs
}

// Merge merges profiles of the same image recorded in several runs into
// one. For each layer, a chunk's place in the merged order is its mean
// relative rank (rank / chunks of that layer in the run, weighted by the
// runs each profile stands for) over the runs that read it, ties broken by
// first-read time and offset, so the result does not depend on the order
// of ps. A run that did not read a chunk does not move it: a later run
// served from a profile may see fewer reads (those served by the kernel
// from cached files). The result is cut to the bounds (the chunks read
// latest go first). Nil profiles are skipped; Merge of none is nil.
func Merge(ps ...*Profile) *Profile {
	var in []*Profile
	for _, p := range ps {
		if p != nil {
			in = append(in, p)
		}
	}
	if len(in) == 0 {
		return nil
	}
	out := &Profile{Version: Version, Image: in[0].Image}
	type acc struct {
		off          int64
		rank, weight float64 // sum of rank*count, sum of count
		time         float64 // sum of time*count over runs with times
		timeWeight   float64
		count        int
	}
	type layerAcc struct {
		d      digest.Digest
		chunks map[int64]*acc
		first  float64 // smallest relative rank, to order layers
	}
	var layers []*layerAcc
	byDigest := map[digest.Digest]*layerAcc{}
	for _, p := range in {
		if out.Image != p.Image {
			out.Image = "" // not one image: keep no subject
		}
		out.Runs = min(out.Runs+p.Runs, MaxRuns)
		for _, l := range p.Layers {
			la := byDigest[l.Digest]
			if la == nil {
				la = &layerAcc{d: l.Digest, chunks: map[int64]*acc{}}
				byDigest[l.Digest] = la
				layers = append(layers, la)
			}
			n := float64(len(l.Chunks))
			for i, off := range l.Chunks {
				a := la.chunks[off]
				if a == nil {
					a = &acc{off: off}
					la.chunks[off] = a
				}
				c := l.count(i, p.Runs)
				w := float64(c)
				a.rank += w * float64(i) / n
				a.weight += w
				a.count = min(a.count+c, MaxRuns)
				if l.Times != nil {
					a.time += w * float64(l.Times[i])
					a.timeWeight += w
				}
			}
		}
	}
	out.Runs = max(out.Runs, 1)
	// Layers in digest order: stable whatever the input order.
	sort.Slice(layers, func(i, j int) bool { return layers[i].d < layers[j].d })
	total := 0
	for _, la := range layers {
		as := make([]*acc, 0, len(la.chunks))
		for _, a := range la.chunks {
			as = append(as, a)
		}
		slices.SortFunc(as, func(a, b *acc) int {
			ra, rb := a.rank/a.weight, b.rank/b.weight
			switch {
			case ra < rb:
				return -1
			case ra > rb:
				return 1
			}
			ta, tb := meanTime(a.time, a.timeWeight), meanTime(b.time, b.timeWeight)
			switch {
			case ta < tb:
				return -1
			case ta > tb:
				return 1
			}
			return cmpInt64(a.off, b.off)
		})
		as = as[:min(len(as), MaxChunksPerLayer, MaxChunks-total)]
		total += len(as)
		ol := Layer{Digest: la.d, Chunks: make([]int64, len(as))}
		allTimes, allRuns := true, true
		for _, a := range as {
			allTimes = allTimes && a.timeWeight > 0
			allRuns = allRuns && a.count >= out.Runs
		}
		if allTimes {
			ol.Times = make([]int64, len(as))
		}
		if !allRuns {
			ol.Counts = make([]int, len(as))
		}
		for i, a := range as {
			ol.Chunks[i] = a.off
			if ol.Times != nil {
				ol.Times[i] = min(int64(math.Round(a.time/a.timeWeight)), MaxTime)
			}
			if ol.Counts != nil {
				ol.Counts[i] = min(a.count, out.Runs)
			}
		}
		if len(ol.Chunks) > 0 && len(out.Layers) < MaxLayers {
			out.Layers = append(out.Layers, ol)
		}
	}
	return out
}

func meanTime(sum, w float64) float64 {
	if w == 0 {
		return math.Inf(1)
	}
	return sum / w
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
