// Package bench measures cold starts: the time from "pull" to a
// container's ready line (or its exit), for any image and command, over an
// emulated WAN link or the real one, for a full pull with containerd's
// overlayfs snapshotter, for lazypull with plain and with optimized
// (prioritized) eStargz images, and for any other proxy snapshotter.
//
// Every run is cold: a fresh containerd in a temporary directory, a fresh
// lazypull-snapshotter with an empty cache, the page cache dropped. Each
// run records its phases (resolve, manifest and config, per-layer TOC or
// download, pull done, container start, first output, ready) and every
// registry request with its timing and kind, from which the report draws a
// waterfall timeline per mode.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazypull/lazypull/bench/images"
	"github.com/lazypull/lazypull/bench/wan"
	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/internal/lab"
	"github.com/lazypull/lazypull/remote"
)

// Mode is how an image is pulled and run: one of the built-in modes or the
// name of a proxy snapshotter given in Config.Proxies.
type Mode string

// The built-in modes.
const (
	// ModeFull pulls the original image with overlayfs (download, unpack).
	ModeFull Mode = "full-pull"
	// ModeLazy pulls the eStargz image (no prefetch hints) with lazypull.
	ModeLazy Mode = "lazypull"
	// ModeOptimized pulls the eStargz image whose start-up files were
	// recorded and prioritized, with lazypull.
	ModeOptimized Mode = "lazypull-optimized"
	// ModePeer pulls the lazypull mode's eStargz image with
	// stargz-snapshotter v0.19.1 (Config.Peer), a fresh daemon and root
	// per run like lazypull's.
	ModePeer Mode = "stargz-snapshotter"
	// ModeFirstNode pulls the eStargz image with a fresh lazypull daemon
	// that records the start-up profile and pushes it to the registry
	// ([profile] record = true, push = true, lookup = false); the bench
	// waits until the registry has it.
	ModeFirstNode Mode = "lazypull-first-node"
	// ModeSecondNode pulls the same image with another fresh daemon and
	// cache that looks the first node's profile up ([profile] lookup =
	// true) and prefetches by it. Selecting it runs ModeFirstNode right
	// before it in every repeat.
	ModeSecondNode Mode = "lazypull-second-node"
)

// Modes lists the built-in modes in report order.
var Modes = []Mode{ModeFull, ModeLazy, ModeOptimized, ModePeer, ModeFirstNode, ModeSecondNode}

// lazypull reports whether the mode runs lazypull-snapshotter.
func (m Mode) lazypull() bool {
	return m == ModeLazy || m == ModeOptimized || m == ModeFirstNode || m == ModeSecondNode
}

// fresh reports whether every run of the mode starts a snapshotter of its
// own (lazypull's or the peer's), whose CPU time and peak memory are
// measured.
func (m Mode) fresh() bool { return m.lazypull() || m == ModePeer }

// profileNode reports whether the mode is one of the two "second node"
// runs, which pull a copy of the image of their own per repeat so that the
// profile the first node pushes reaches only its second node.
func (m Mode) profileNode() bool { return m == ModeFirstNode || m == ModeSecondNode }

// profileConfig is the daemon's [profile] table for the mode (empty for
// the others: a daemon without the profile settings is never given them).
func (m Mode) profileConfig() string {
	switch m {
	case ModeFirstNode:
		return "[profile]\nrecord = true\npush = true\nlookup = false\n"
	case ModeSecondNode:
		return "[profile]\nrecord = false\npush = false\nlookup = true\n"
	}
	return ""
}

// NoWAN is the profile name that measures the registry and link as they
// are, without the WAN emulator.
const NoWAN = "none"

// DefaultProfiles are the WAN links the hellobench preset measures.
func DefaultProfiles() []wan.Profile {
	return []wan.Profile{
		{Name: "40ms-100Mbit", RTT: 40 * time.Millisecond, BitsPerSecond: 100_000_000},
		{Name: "2ms-1Gbit", RTT: 2 * time.Millisecond, BitsPerSecond: 1_000_000_000},
	}
}

// Workload is one image and the command whose start-up is measured.
type Workload struct {
	// Name labels the workload in reports.
	Name string
	// Description says what it does.
	Description string
	// Source is the image: a registry reference or oci-layout:DIR[:TAG].
	Source string
	// Cmd replaces the image's command; empty runs the image's own.
	Cmd []string
	// Ready matches the output line that means "started"; nil waits for
	// the command to exit (with status 0).
	Ready *regexp.Regexp
}

// Config tunes a benchmark run.
type Config struct {
	// Workloads to measure.
	Workloads []Workload
	// Preset workloads are built from Debian packages first (see
	// package images) and then measured like Workloads.
	Preset []images.Spec
	// Profiles are the WAN links; a profile named NoWAN measures the link
	// as it is (default: NoWAN).
	Profiles []wan.Profile
	// Modes to measure (default full pull and lazypull).
	Modes []Mode
	// Proxies are other snapshotters, by name, at their gRPC sockets; a
	// mode with one of these names runs with it.
	Proxies map[string]string
	// Convert converts each image to eStargz first (into the loopback
	// registry); without it the lazypull modes pull the image as it is.
	Convert bool
	// ConvertTo, when set, also writes the converted image to this
	// registry reference or oci-layout:DIR[:TAG] (the optimized one under
	// the tag with "-optimized" appended). Without WAN emulation and with
	// a registry there, the lazypull modes pull from it. Implies Convert.
	ConvertTo string
	// Platform selects the image's platform (default: this host's).
	Platform string
	// Repeats per workload, mode and profile (default 1); the median
	// counts.
	Repeats int
	// ReadyTimeout bounds the wait for the ready line (default 10m).
	ReadyTimeout time.Duration
	// Limit also measures each workload's lower limit (a warm local run
	// plus the start-up bytes over the link); it needs a recorded start-up,
	// i.e. the optimized mode.
	Limit bool
	// CacheDir keeps built preset images, and the loopback registry's
	// storage for them, between runs (default: a temporary directory).
	// Copies of Workloads' images are always temporary.
	CacheDir string
	// Snapshotter is the lazypull-snapshotter binary.
	Snapshotter string
	// Peer is stargz-snapshotter's daemon (containerd-stargz-grpc, see
	// BuildPeer) for ModePeer.
	Peer string
	// PeerConfig is the peer daemon's TOML (default: upstream's defaults).
	PeerConfig string
	// ProfileWait bounds the wait for the first node's profile to appear
	// in the registry (default 60s).
	ProfileWait time.Duration
	// SnapshotterConfig is extra TOML for the daemon (fetch settings).
	SnapshotterConfig string
	// Remote reads and writes images for conversion (default: plain
	// remote.New, credentials from the docker config).
	Remote *remote.Registry
	// Resolver makes containerd's resolver for pulls (default plain HTTP
	// to 127.0.0.1, HTTPS elsewhere, docker config credentials).
	Resolver func() remotes.Resolver
	// Log receives progress lines (default os.Stderr; io.Discard for
	// quiet).
	Log io.Writer
}

// Phase is the end of one step of a cold start, in seconds since the pull
// began.
type Phase struct {
	Name    string
	Seconds float64
}

// The phases of a run, in order.
const (
	PhaseResolve  = "resolve"
	PhaseManifest = "manifest+config"
	PhaseLayers   = "layers" // every layer's TOC (lazy) or download (full)
	PhasePull     = "pull done"
	PhaseStart    = "container start"
	PhaseOutput   = "first output"
	PhaseReady    = "ready"
)

// PhaseNames lists the phases in order.
var PhaseNames = []string{PhaseResolve, PhaseManifest, PhaseLayers, PhasePull, PhaseStart, PhaseOutput, PhaseReady}

// Request kinds in timelines.
const (
	KindResolve    = "resolve"
	KindManifest   = "manifest"   // manifest, index or config
	KindLayer      = "layer"      // a whole layer blob (full pull)
	KindTOC        = "toc"        // a layer's HEAD, footer and TOC
	KindForeground = "foreground" // a read's miss, alone
	KindReadAhead  = "read-ahead" // a read's miss with the chunks after it
	KindPrefetch   = "prefetch"   // the prioritized region, after mount
	KindBackground = "background"
)

// Kinds lists the request kinds in legend order.
var Kinds = []string{KindResolve, KindManifest, KindLayer, KindTOC, KindForeground, KindReadAhead, KindPrefetch, KindBackground}

// Request is one registry request of a run.
type Request struct {
	// Start and End are seconds since the pull began.
	Start, End float64
	Kind       string
	// By is who made it: "containerd" or "snapshotter".
	By     string
	Layer  string `json:",omitempty"`
	Offset int64  `json:",omitempty"`
	Length int64  `json:",omitempty"`
	Bytes  int64
	Status int    `json:",omitempty"`
	Err    string `json:",omitempty"`
}

// LayerTime is when one layer was ready: its TOC read (lazy) or its blob
// downloaded (full pull).
type LayerTime struct {
	Digest  string
	Seconds float64
}

// Sample is one cold start.
type Sample struct {
	Image, Profile string
	Mode           Mode
	Repeat         int
	Ref            string
	// Phases in order; the last one's Seconds is TotalSeconds.
	Phases        []Phase
	Layers        []LayerTime
	PullSeconds   float64 // until the image is ready to run
	ReadySeconds  float64 // from pull done to the ready line
	TotalSeconds  float64
	BytesReceived int64 // over the link (the WAN emulator's count, else the requests')
	// ForegroundBytes and BackgroundBytes split the snapshotter's content
	// fetches (lazypull modes).
	ForegroundBytes, BackgroundBytes       int64
	ForegroundRequests, BackgroundRequests int64
	// DaemonRequests is lazypull_fetch_requests_total at the ready line.
	DaemonRequests int64
	PeakRSSBytes   int64 // the snapshotter's VmHWM (modes with a fresh daemon: lazypull's and the peer), summed over the daemon and lazypull's fuse manager
	// DaemonCPUSeconds is the user+system CPU time the snapshotter spent
	// from the pull to the ready line (modes with a fresh daemon; for
	// lazypull, the daemon and its fuse manager together).
	DaemonCPUSeconds float64
	// LinkUtilization is the share of the link the run used: bytes over
	// the link (the WAN emulator's count, both directions' payload toward
	// the node) / (link rate × TotalSeconds); 0 without an emulated link.
	LinkUtilization float64
	// ForegroundLatencyMedian and ForegroundLatencyP90 are the median and
	// 90th percentile, in seconds, of the daemon's foreground fetches (a
	// read's miss with its read-ahead; prefetches of a prioritized region
	// excluded), from its fetch log (lazypull modes; 0 when none).
	ForegroundLatencyMedian, ForegroundLatencyP90 float64
	ReadyLine                                     string
	// Requests is the timeline: every registry request, by start.
	Requests []Request
}

// Limit is an image's lower bound on a profile.
type Limit struct {
	Image, Profile string
	// LocalSeconds is the workload's time with the image local and warm.
	LocalSeconds float64
	// ReadBytes is the compressed size of the chunks the workload reads.
	ReadBytes int64
	// Seconds is LocalSeconds + ReadBytes/bandwidth + 3 RTT.
	Seconds float64
}

// Result is the outcome of a benchmark run.
type Result struct {
	Started    time.Time
	Host       string
	Containerd string
	Profiles   []wan.Profile
	Modes      []Mode
	Images     []ImageInfo
	Samples    []Sample
	Limits     []Limit
	Summary    []Summary
}

// ImageInfo describes a measured image.
type ImageInfo struct {
	Name, Description string
	Source            string
	Cmd               []string
	Ready             string
	Layers            int
	CompressedBytes   int64 // original image
	UncompressedBytes int64
	EStargzBytes      int64
	PrioritizedFiles  int
	// Refs are the references measured, by mode, relative to the
	// registry (the loopback one or the image's own).
	Refs map[Mode]string
}

// Summary is the median of one image, mode and profile.
type Summary struct {
	Image, Profile string
	Mode           Mode
	PullSeconds    float64
	ReadySeconds   float64
	TotalSeconds   float64
	// Phases are the phases' medians.
	Phases        []Phase
	BytesReceived int64
	// ForegroundBytes and BackgroundBytes are the snapshotter's (lazypull
	// modes).
	ForegroundBytes, BackgroundBytes int64
	Requests                         int
	PeakRSSBytes                     int64
	DaemonCPUSeconds                 float64 // median
	LinkUtilization                  float64 // median
	// ForegroundLatencyMedian and ForegroundLatencyP90 are the medians of
	// the runs' foreground fetch latencies, in seconds.
	ForegroundLatencyMedian, ForegroundLatencyP90 float64
	VsFullPull                                    float64 // TotalSeconds / full pull's
	// VsPeer is TotalSeconds / the peer's (ModePeer) on the same image
	// and link.
	VsPeer  float64
	VsLimit float64 // TotalSeconds / limit
}

// Runner runs the benchmark.
type Runner struct {
	cfg     Config
	reg     *lab.Registry
	remote  *remote.Registry
	builder *images.Builder
	log     io.Writer
	match   platforms.MatchComparer
	infos   map[string]*ImageInfo
	// remoteRefs are, per workload, the modes whose Refs are full
	// references outside the loopback registry.
	remoteRefs map[string]map[Mode]bool
	reads      map[string][]string
	// readBytes is, per image, the compressed size of the chunks read at
	// start-up.
	readBytes map[string]int64
	tmp       string
	// chunkCache holds layers' chunk offsets by digest (nil: unreadable).
	chunkCache map[string]*layerChunks
}

// NewRunner checks the configuration.
func NewRunner(cfg Config) (*Runner, error) {
	if cfg.Repeats <= 0 {
		cfg.Repeats = 1
	}
	if len(cfg.Modes) == 0 {
		cfg.Modes = []Mode{ModeFull, ModeLazy}
	}
	if cfg.ProfileWait <= 0 {
		cfg.ProfileWait = time.Minute
	}
	if len(cfg.Profiles) == 0 {
		cfg.Profiles = []wan.Profile{{Name: NoWAN}}
	}
	if cfg.ReadyTimeout <= 0 {
		cfg.ReadyTimeout = 10 * time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = os.Stderr
	}
	if len(cfg.Workloads)+len(cfg.Preset) == 0 {
		return nil, errors.New("bench: no image to measure")
	}
	if cfg.ConvertTo != "" {
		cfg.Convert = true
		if len(cfg.Workloads)+len(cfg.Preset) != 1 {
			return nil, errors.New("bench: --convert-to takes one image")
		}
		if _, err := withTagSuffix(cfg.ConvertTo, "-optimized"); err != nil {
			return nil, fmt.Errorf("bench: %w", err)
		}
	}
	seen := map[Mode]bool{}
	for _, m := range cfg.Modes {
		if seen[m] {
			return nil, fmt.Errorf("bench: mode %q given twice", m)
		}
		seen[m] = true
		if m == ModeFull || m.fresh() {
			continue
		}
		if _, ok := cfg.Proxies[string(m)]; !ok {
			var names []string
			for _, b := range Modes {
				names = append(names, string(b))
			}
			return nil, fmt.Errorf("bench: unknown mode %q (built in: %s; others need --snapshotter %s=SOCKET)", m, strings.Join(names, ", "), m)
		}
	}
	cfg.Modes = withFirstNode(cfg.Modes)
	if seen[ModePeer] && cfg.Peer == "" {
		return nil, fmt.Errorf("bench: mode %s needs stargz-snapshotter's daemon (containerd-stargz-grpc: make bench-peer, or --stargz-bin)", ModePeer)
	}
	if (seen[ModeFirstNode] || seen[ModeSecondNode]) && strings.Contains(cfg.SnapshotterConfig, "[profile]") {
		return nil, fmt.Errorf("bench: modes %s and %s set the daemon's [profile]: leave it out of the snapshotter config", ModeFirstNode, ModeSecondNode)
	}
	if seen[ModeOptimized] && !cfg.Convert && len(cfg.Workloads) > 0 {
		return nil, fmt.Errorf("bench: mode %s needs --convert: the image is converted again with its recorded start-up files first", ModeOptimized)
	}
	if cfg.Limit && !seen[ModeOptimized] {
		cfg.Limit = false
	}
	if (seen[ModeLazy] || seen[ModeOptimized] || seen[ModeFirstNode] || seen[ModeSecondNode]) && cfg.Snapshotter == "" {
		return nil, errors.New("bench: no lazypull-snapshotter binary")
	}
	if err := lab.Containerd2().Check(); err != nil {
		return nil, fmt.Errorf("bench: %w (run hack/install-deps.sh)", err)
	}
	match := platforms.Default()
	if cfg.Platform != "" {
		p, err := platforms.Parse(cfg.Platform)
		if err != nil {
			return nil, fmt.Errorf("bench: platform %q: %w", cfg.Platform, err)
		}
		match = platforms.Only(p)
	}
	if cfg.Remote == nil {
		r, err := remote.New(remote.Options{})
		if err != nil {
			return nil, err
		}
		cfg.Remote = r
	}
	if cfg.Resolver == nil {
		cfg.Resolver = lab.Resolver
	}
	return &Runner{cfg: cfg, log: cfg.Log, remote: cfg.Remote, match: match,
		infos: map[string]*ImageInfo{}, remoteRefs: map[string]map[Mode]bool{}, reads: map[string][]string{}, readBytes: map[string]int64{},
		chunkCache: map[string]*layerChunks{}}, nil
}

// withFirstNode puts ModeFirstNode right before ModeSecondNode (adding it
// when missing): the second node finds the profile the first one pushed in
// the same repeat.
func withFirstNode(modes []Mode) []Mode {
	second := false
	for _, m := range modes {
		second = second || m == ModeSecondNode
	}
	if !second {
		return modes
	}
	out := make([]Mode, 0, len(modes)+1)
	for _, m := range modes {
		switch m {
		case ModeFirstNode:
		case ModeSecondNode:
			out = append(out, ModeFirstNode, ModeSecondNode)
		default:
			out = append(out, m)
		}
	}
	return out
}

func (r *Runner) logf(format string, args ...any) {
	fmt.Fprintf(r.log, "bench: "+format+"\n", args...)
}

// Run prepares the images (building, copying into the loopback registry,
// converting, recording start-up reads as needed), measures every
// combination and returns the result. Temporary state is removed before it
// returns, also on errors.
func (r *Runner) Run(ctx context.Context) (_ *Result, retErr error) {
	res := &Result{Started: time.Now().UTC(), Profiles: r.cfg.Profiles, Modes: r.cfg.Modes, Containerd: lab.Containerd2().Name}
	runID := fmt.Sprintf("%x", time.Now().UnixNano()&0xffffffffff)
	res.Host, _ = os.Hostname()
	tmp, err := os.MkdirTemp("", "lazypull-bench-")
	if err != nil {
		return nil, err
	}
	r.tmp = tmp
	defer os.RemoveAll(tmp)
	cacheDir := r.cfg.CacheDir
	if cacheDir == "" {
		cacheDir = tmp
	}
	r.builder = &images.Builder{CacheDir: cacheDir, Log: r.log}
	// Built images stay in the cache's registry, to be reused; copies of
	// the user's images go with the temporary directory.
	regDir := filepath.Join(tmp, "registry")
	if len(r.cfg.Preset) > 0 {
		regDir = filepath.Join(cacheDir, "registry")
	}
	reg, err := lab.StartRegistry(lab.RegistryConfig{RootDir: regDir})
	if err != nil {
		return nil, fmt.Errorf("starting the loopback registry: %w", err)
	}
	defer reg.Close()
	r.reg = reg
	if err := r.checkProxies(ctx); err != nil {
		return nil, err
	}
	works := append([]Workload(nil), r.cfg.Workloads...)
	for _, spec := range r.cfg.Preset {
		layout, err := r.builder.Build(ctx, spec)
		if err != nil {
			return nil, fmt.Errorf("building %s: %w", spec.Name, err)
		}
		works = append(works, Workload{Name: spec.Name, Description: spec.Description,
			Source: convert.LayoutPrefix + layout + ":v1", Cmd: spec.Cmd, Ready: regexp.MustCompile("^" + regexp.QuoteMeta(spec.Ready))})
	}
	for i := range works {
		w := &works[i]
		if w.Name == "" {
			w.Name = shortName(w.Source)
		}
		if _, dup := r.infos[w.Name]; dup {
			return nil, fmt.Errorf("bench: two images named %q", w.Name)
		}
		if err := r.prepare(ctx, *w); err != nil {
			return nil, fmt.Errorf("preparing %s: %w", w.Name, err)
		}
		res.Images = append(res.Images, *r.infos[w.Name])
		if r.remoteRefs[w.Name][ModeLazy] && (r.hasMode(ModeFirstNode) || r.hasMode(ModeSecondNode)) {
			return nil, fmt.Errorf("bench: %s: modes %s and %s need the image in the bench's loopback registry (the first node pushes its profile there): use --convert or --wan", w.Name, ModeFirstNode, ModeSecondNode)
		}
	}
	total := len(works) * len(r.cfg.Profiles) * len(r.cfg.Modes) * r.cfg.Repeats
	done := 0
	for _, p := range r.cfg.Profiles {
		var px *wan.Proxy
		if p.Name != NoWAN {
			if px, err = wan.Listen("127.0.0.1:0", reg.Host(), p); err != nil {
				return nil, err
			}
		}
		err := func() error {
			if px != nil {
				defer px.Close()
			}
			for _, w := range works {
				info := r.infos[w.Name]
				for rep := 1; rep <= r.cfg.Repeats; rep++ {
					profileRepo := ""
					for _, mode := range r.cfg.Modes {
						done++
						ref := r.refFor(info, mode, px)
						tag := fmt.Sprintf("[%d/%d] %s %s %s #%d", done, total, w.Name, mode, p.Name, rep)
						if mode.profileNode() && !r.remoteRefs[info.Name][ModeLazy] {
							if profileRepo == "" {
								// A repository of its own per repeat: the
								// profile the first node pushes reaches only
								// this repeat's second node, never the other
								// modes' runs.
								profileRepo = fmt.Sprintf("bench/%s-profile-%s-%s-%d:esgz", sanitize(w.Name), runID, sanitize(p.Name), rep)
								if err := r.copyWithin(ctx, info.Refs[ModeLazy], profileRepo); err != nil {
									return fmt.Errorf("%s: copying the image for the profile runs: %w", tag, err)
								}
							}
							ref = r.reg.Ref(profileRepo)
							if px != nil {
								ref = px.Addr() + "/" + profileRepo
							}
						}
						s, err := r.measure(ctx, w, mode, ref, px, tag)
						if err != nil {
							return fmt.Errorf("%s %s %s #%d: %w", w.Name, mode, p.Name, rep, err)
						}
						s.Profile, s.Repeat = p.Name, rep
						res.Samples = append(res.Samples, s)
						r.logf("%s: pull %.2fs, ready %.2fs, total %.2fs, %s over the link in %d requests%s",
							tag, s.PullSeconds, s.ReadySeconds, s.TotalSeconds, human(s.BytesReceived), len(s.Requests), rssNote(s.PeakRSSBytes))
					}
				}
				if r.cfg.Limit && r.readBytes[w.Name] > 0 {
					lim, err := r.limit(ctx, w, p)
					if err != nil {
						return fmt.Errorf("limit of %s: %w", w.Name, err)
					}
					res.Limits = append(res.Limits, lim)
				}
			}
			return nil
		}()
		if err != nil {
			return nil, err
		}
	}
	res.Summary = summarize(res)
	return res, nil
}

func rssNote(n int64) string {
	if n == 0 {
		return ""
	}
	return ", snapshotter peak RSS " + human(n)
}

func mb(n int64) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f MB", float64(n)/1e6)
}

// shortName turns a reference into a workload name: its last path
// element without the tag or digest.
func shortName(ref string) string {
	ref = strings.TrimPrefix(ref, convert.LayoutPrefix)
	if i := strings.Index(ref, "@"); i >= 0 {
		ref = ref[:i]
	}
	ref = filepath.Base(ref)
	if i := strings.LastIndex(ref, ":"); i >= 0 {
		ref = ref[:i]
	}
	if ref == "" || ref == "." || ref == "/" {
		return "image"
	}
	return ref
}

// refFor returns the reference a mode pulls: through the WAN emulator
// when there is one.
func (r *Runner) refFor(info *ImageInfo, m Mode, px *wan.Proxy) string {
	if info.Refs[m] == "" {
		m = ModeLazy
	}
	if info.Refs[m] == "" {
		m = ModeFull
	}
	ref := info.Refs[m]
	if r.remoteRefs[info.Name][m] {
		return ref
	}
	if px != nil {
		return px.Addr() + "/" + ref
	}
	return r.reg.Ref(ref)
}

// directRef is refFor without the WAN emulator: for reading TOCs outside
// the measurement.
func (r *Runner) directRef(info *ImageInfo, m Mode) string {
	return r.refFor(info, m, nil)
}

// prepare copies the workload's image into the loopback registry (when
// it is converted, emulated over a WAN or a layout), converts it, and
// records its start-up reads and converts it again with them for the
// optimized mode.
func (r *Runner) prepare(ctx context.Context, w Workload) error {
	info := &ImageInfo{Name: w.Name, Description: w.Description, Source: w.Source, Cmd: w.Cmd, Refs: map[Mode]string{}}
	if w.Ready != nil {
		info.Ready = w.Ready.String()
	}
	r.infos[w.Name] = info
	src, err := convert.OpenStore(w.Source, r.remote)
	if err != nil {
		return err
	}
	wanOn := false
	for _, p := range r.cfg.Profiles {
		wanOn = wanOn || p.Name != NoWAN
	}
	isLayout := strings.HasPrefix(w.Source, convert.LayoutPrefix)
	if !r.cfg.Convert && !wanOn && !isLayout {
		// Measured where it is: the lazypull modes pull it as it is.
		r.logf("%s: resolving %s", w.Name, w.Source)
		m, err := r.manifestOf(ctx, src)
		if err != nil {
			return fmt.Errorf("%s: %w", w.Source, err)
		}
		fillSizes(info, m, false)
		r.remoteRefs[w.Name] = map[Mode]bool{}
		for _, mode := range r.cfg.Modes {
			info.Refs[mode] = w.Source
			r.remoteRefs[w.Name][mode] = true
		}
		r.warnIfNotLazy(info, m)
		return nil
	}
	repo := "bench/" + sanitize(w.Name)
	info.Refs[ModeFull] = repo + ":orig"
	r.logf("%s: copying %s into the loopback registry", w.Name, w.Source)
	dst, err := convert.OpenStore(r.reg.Ref(info.Refs[ModeFull]), r.remote)
	if err != nil {
		return err
	}
	m, err := r.copyImage(ctx, src, dst)
	if err != nil {
		return fmt.Errorf("copying %s: %w", w.Source, err)
	}
	fillSizes(info, m, false)
	info.Refs[ModeLazy] = info.Refs[ModeFull]
	if !r.cfg.Convert {
		r.warnIfNotLazy(info, m)
		return nil
	}
	origSrc, err := convert.OpenStore(r.reg.Ref(info.Refs[ModeFull]), r.remote)
	if err != nil {
		return err
	}
	info.Refs[ModeLazy] = repo + ":esgz"
	r.logf("%s: converting to eStargz", w.Name)
	lazyDst, err := convert.OpenStore(r.reg.Ref(info.Refs[ModeLazy]), r.remote)
	if err != nil {
		return err
	}
	if _, err := convert.Convert(ctx, origSrc, lazyDst, convert.Options{}); err != nil {
		return fmt.Errorf("converting: %w", err)
	}
	lsrc, err := convert.OpenStore(r.reg.Ref(info.Refs[ModeLazy]), r.remote)
	if err != nil {
		return err
	}
	lm, err := r.manifestOf(ctx, lsrc)
	if err != nil {
		return err
	}
	fillSizes(info, lm, true)
	if !r.hasMode(ModeOptimized) {
		return r.publish(ctx, w, info, wanOn)
	}
	r.logf("%s: recording start-up reads", w.Name)
	reads, readBytes, err := r.record(ctx, w, r.reg.Ref(info.Refs[ModeLazy]))
	if err != nil {
		return fmt.Errorf("recording: %w", err)
	}
	r.reads[w.Name] = reads
	r.readBytes[w.Name] = readBytes
	info.PrioritizedFiles = len(reads)
	info.Refs[ModeOptimized] = repo + ":esgz-opt"
	optDst, err := convert.OpenStore(r.reg.Ref(info.Refs[ModeOptimized]), r.remote)
	if err != nil {
		return err
	}
	r.logf("%s: converting with %d prioritized files", w.Name, len(reads))
	if _, err := convert.Convert(ctx, origSrc, optDst, convert.Options{Build: estargz.BuildOptions{Prioritized: reads}}); err != nil {
		return fmt.Errorf("converting with prioritized files: %w", err)
	}
	return r.publish(ctx, w, info, wanOn)
}

// publish copies the converted images to Config.ConvertTo and, when no
// link is emulated and it is a registry, measures them there.
func (r *Runner) publish(ctx context.Context, w Workload, info *ImageInfo, wanOn bool) error {
	if r.cfg.ConvertTo == "" {
		return nil
	}
	dsts := map[Mode]string{ModeLazy: r.cfg.ConvertTo}
	if info.Refs[ModeOptimized] != "" {
		opt, err := withTagSuffix(r.cfg.ConvertTo, "-optimized")
		if err != nil {
			return err
		}
		dsts[ModeOptimized] = opt
	}
	for _, mode := range []Mode{ModeLazy, ModeOptimized} {
		to, ok := dsts[mode]
		if !ok {
			continue
		}
		r.logf("%s: writing the %s image to %s", w.Name, mode, to)
		src, err := convert.OpenStore(r.reg.Ref(info.Refs[mode]), r.remote)
		if err != nil {
			return err
		}
		dst, err := convert.OpenStore(to, r.remote)
		if err != nil {
			return err
		}
		if _, err := r.copyImage(ctx, src, dst); err != nil {
			return fmt.Errorf("writing %s: %w", to, err)
		}
		if !wanOn && !strings.HasPrefix(to, convert.LayoutPrefix) {
			info.Refs[mode] = to
			if r.remoteRefs[w.Name] == nil {
				r.remoteRefs[w.Name] = map[Mode]bool{}
			}
			r.remoteRefs[w.Name][mode] = true
		}
	}
	return nil
}

// withTagSuffix appends suffix to a reference's tag: registry/repo:tag or
// oci-layout:DIR:TAG.
func withTagSuffix(ref, suffix string) (string, error) {
	if strings.Contains(ref, "@") {
		return "", fmt.Errorf("%q: a destination needs a tag, not a digest", ref)
	}
	slash := strings.LastIndex(ref, "/")
	if i := strings.LastIndex(ref, ":"); i > slash && i > len(convert.LayoutPrefix)-1 {
		return ref + suffix, nil
	}
	return "", fmt.Errorf("%q: a destination needs a tag (REF:TAG or oci-layout:DIR:TAG)", ref)
}

// warnIfNotLazy says so when the lazypull mode will pull an image without
// eStargz layers (lazypull-snapshotter then unpacks them like a full pull).
func (r *Runner) warnIfNotLazy(info *ImageInfo, m *ocispec.Manifest) {
	if !r.hasMode(ModeLazy) {
		return
	}
	for _, l := range m.Layers {
		if l.Annotations[estargz.TOCDigestAnnotation] != "" {
			return
		}
	}
	r.logf("%s: warning: no eStargz layer in %s; lazypull will unpack it like a full pull (use --convert)", info.Name, info.Source)
}

func (r *Runner) hasMode(m Mode) bool {
	for _, x := range r.cfg.Modes {
		if x == m {
			return true
		}
	}
	return false
}

// sanitize makes a repository path component out of a name.
func sanitize(name string) string { return fileSafe(strings.ToLower(name)) }

// fileSafe keeps letters, digits, '-', '.' and '_' and turns the rest
// into '-'.
func fileSafe(name string) string {
	var b strings.Builder
	for _, c := range name {
		if (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' {
			b.WriteRune(c)
		} else {
			b.WriteByte('-')
		}
	}
	if b.Len() == 0 {
		return "image"
	}
	return strings.Trim(b.String(), "-._")
}

func fillSizes(info *ImageInfo, m *ocispec.Manifest, esgz bool) {
	var comp, uncomp int64
	for _, l := range m.Layers {
		comp += l.Size
		if n, err := strconv.ParseInt(l.Annotations[estargz.UncompressedSizeAnnotation], 10, 64); err == nil && n > 0 {
			uncomp += n
		}
	}
	if esgz {
		info.EStargzBytes = comp
		if uncomp > 0 {
			info.UncompressedBytes = uncomp
		}
		return
	}
	info.Layers = len(m.Layers)
	info.CompressedBytes = comp
	if uncomp > 0 {
		info.UncompressedBytes = uncomp
	}
}

// manifestOf returns the image's manifest for the platform.
func (r *Runner) manifestOf(ctx context.Context, src convert.Store) (*ocispec.Manifest, error) {
	_, raw, m, err := r.platformManifest(ctx, src)
	_ = raw
	return m, err
}

// platformManifest returns the store's manifest for the platform: the
// root, or the best match of an index.
func (r *Runner) platformManifest(ctx context.Context, src convert.Store) (ocispec.Descriptor, []byte, *ocispec.Manifest, error) {
	desc, raw, err := src.Root(ctx)
	if err != nil {
		return ocispec.Descriptor{}, nil, nil, err
	}
	for depth := 0; depth < 4; depth++ {
		idx, ok := parseIndex(desc.MediaType, raw)
		if !ok {
			m, err := parseManifest(raw)
			if err != nil {
				return ocispec.Descriptor{}, nil, nil, err
			}
			return desc, raw, m, nil
		}
		var best *ocispec.Descriptor
		for i := range idx.Manifests {
			d := &idx.Manifests[i]
			if d.Platform == nil || !r.match.Match(*d.Platform) {
				continue
			}
			if best == nil || r.match.Less(*d.Platform, *best.Platform) {
				best = d
			}
		}
		if best == nil {
			return ocispec.Descriptor{}, nil, nil, fmt.Errorf("no manifest for the platform in the index of %s", src)
		}
		rc, err := src.Fetch(ctx, *best)
		if err != nil {
			return ocispec.Descriptor{}, nil, nil, err
		}
		raw, err = io.ReadAll(io.LimitReader(rc, 4<<20))
		rc.Close()
		if err != nil {
			return ocispec.Descriptor{}, nil, nil, err
		}
		desc = *best
	}
	return ocispec.Descriptor{}, nil, nil, fmt.Errorf("%s: indexes nested too deep", src)
}

// copyImage copies the platform's manifest of src, with its blobs, to dst.
func (r *Runner) copyImage(ctx context.Context, src, dst convert.Store) (*ocispec.Manifest, error) {
	desc, raw, m, err := r.platformManifest(ctx, src)
	if err != nil {
		return nil, err
	}
	for _, b := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		ok, err := dst.Exists(ctx, b)
		if err != nil {
			return nil, err
		}
		if ok {
			continue
		}
		rc, err := src.Fetch(ctx, b)
		if err != nil {
			return nil, err
		}
		err = dst.Push(ctx, b, rc)
		rc.Close()
		if err != nil {
			return nil, err
		}
	}
	desc.Platform = nil
	return m, dst.PushManifest(ctx, desc, raw, true)
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func summarize(res *Result) []Summary {
	type key struct {
		img, prof string
		mode      Mode
	}
	groups := map[key][]Sample{}
	var order []key
	for _, s := range res.Samples {
		k := key{s.Image, s.Profile, s.Mode}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], s)
	}
	limits := map[[2]string]float64{}
	for _, l := range res.Limits {
		limits[[2]string{l.Image, l.Profile}] = l.Seconds
	}
	var out []Summary
	full, peer := map[[2]string]float64{}, map[[2]string]float64{}
	for _, k := range order {
		ss := groups[k]
		var pull, ready, total, bytes, fg, bg, rss, reqs, cpu, util, latMed, latP90 []float64
		phases := map[string][]float64{}
		for _, s := range ss {
			pull = append(pull, s.PullSeconds)
			ready = append(ready, s.ReadySeconds)
			total = append(total, s.TotalSeconds)
			bytes = append(bytes, float64(s.BytesReceived))
			fg = append(fg, float64(s.ForegroundBytes))
			bg = append(bg, float64(s.BackgroundBytes))
			rss = append(rss, float64(s.PeakRSSBytes))
			cpu = append(cpu, s.DaemonCPUSeconds)
			util = append(util, s.LinkUtilization)
			latMed = append(latMed, s.ForegroundLatencyMedian)
			latP90 = append(latP90, s.ForegroundLatencyP90)
			reqs = append(reqs, float64(len(s.Requests)))
			for _, p := range s.Phases {
				phases[p.Name] = append(phases[p.Name], p.Seconds)
			}
		}
		sum := Summary{Image: k.img, Profile: k.prof, Mode: k.mode,
			PullSeconds: median(pull), ReadySeconds: median(ready), TotalSeconds: median(total),
			BytesReceived: int64(median(bytes)), ForegroundBytes: int64(median(fg)), BackgroundBytes: int64(median(bg)),
			Requests: int(median(reqs)), PeakRSSBytes: int64(slicesMax(rss)), DaemonCPUSeconds: median(cpu),
			LinkUtilization: median(util), ForegroundLatencyMedian: median(latMed), ForegroundLatencyP90: median(latP90)}
		for _, name := range PhaseNames {
			if v, ok := phases[name]; ok {
				sum.Phases = append(sum.Phases, Phase{Name: name, Seconds: median(v)})
			}
		}
		switch k.mode {
		case ModeFull:
			full[[2]string{k.img, k.prof}] = sum.TotalSeconds
		case ModePeer:
			peer[[2]string{k.img, k.prof}] = sum.TotalSeconds
		}
		out = append(out, sum)
	}
	for i := range out {
		s := &out[i]
		if f := full[[2]string{s.Image, s.Profile}]; f > 0 {
			s.VsFullPull = s.TotalSeconds / f
		}
		if pe := peer[[2]string{s.Image, s.Profile}]; pe > 0 {
			s.VsPeer = s.TotalSeconds / pe
		}
		if l := limits[[2]string{s.Image, s.Profile}]; l > 0 {
			s.VsLimit = s.TotalSeconds / l
		}
	}
	return out
}

func slicesMax(xs []float64) float64 {
	m := 0.0
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

// copyWithin copies an image of the loopback registry to another
// repository of it (blobs are pushed again: the registry mounts nothing
// across repositories on its own).
func (r *Runner) copyWithin(ctx context.Context, from, to string) error {
	src, err := convert.OpenStore(r.reg.Ref(from), r.remote)
	if err != nil {
		return err
	}
	dst, err := convert.OpenStore(r.reg.Ref(to), r.remote)
	if err != nil {
		return err
	}
	_, err = r.copyImage(ctx, src, dst)
	return err
}

// percentile returns the nearest-rank p-th percentile (0 < p <= 100) of
// xs, 0 for none.
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}
