package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"github.com/lazypull/lazypull/bench"
	"github.com/lazypull/lazypull/bench/images"
	"github.com/lazypull/lazypull/bench/wan"
)

// benchFlags are the flags of lazypull bench.
type benchFlags struct {
	rf             registryFlags
	ready          string
	modes          string
	snapshotters   []string
	wans           []string
	repeats        int
	out            string
	convert        bool
	convertTo      string
	platform       string
	preset         string
	jsonOut        bool
	timeout        time.Duration
	snapshotterBin string
	snapshotterCfg string
	stargzBin      string
	stargzCfg      string
	cacheDir       string
	name           string
	from           string
	convertCompare string
}

func newBenchCommand() *cobra.Command {
	var f benchFlags
	cmd := &cobra.Command{
		Use:   "bench [flags] IMAGE [-- CMD...]",
		Short: "Measure cold starts of an image: full pull against lazy pull, with a timeline of every request",
		Long: `Measure how long IMAGE takes to start, cold, with each mode: a full pull with
overlayfs (full-pull), lazypull (lazypull), lazypull with the start-up files
recorded and prioritized (lazypull-optimized, needs --convert),
stargz-snapshotter v0.19.1 on the same eStargz image (stargz-snapshotter, a
fresh daemon and root per run), a "second node" pair (lazypull-second-node: a
fresh daemon records the start-up profile and pushes it to the registry
(lazypull-first-node), then another fresh daemon and cache finds it and
prefetches by it), and any other proxy snapshotter given with --snapshotter
NAME=SOCKET.

Every run starts a fresh containerd 2 in a temporary directory (never the
machine's own), a fresh lazypull-snapshotter with an empty cache, and drops
the page cache. The time runs from the pull to the first output line matching
--ready (or to CMD's exit). With --wan the registry is reached through a
user-space WAN emulator (the image is copied into a loopback registry first);
--wan none measures the registry and link as they are. --convert converts the
image to eStargz in the loopback registry first (a plain image pulled with
lazypull is unpacked like a full pull). IMAGE is a registry reference or
oci-layout:DIR[:TAG]; credentials come from the docker config.

The report goes to --out: results.json (every run, with its phases and every
registry request), results.md (medians, ratios against the full pull and the
peer), a chart of the totals, charts of each mode's snapshotter CPU-seconds,
link utilization and foreground fetch latency, one timeline per mode
(timeline-*.svg: the requests over time coloured by kind, the phases, the
link's utilization) and report.html bundling them. Needs root.

The stargz-snapshotter mode runs containerd-stargz-grpc from --stargz-bin,
next to lazypull, or $PATH; failing those, in a lazypull source tree, it is
built from bench/peer/stargz (its own Go module) into --cache-dir.`,
		Example: `  lazypull bench --convert --wan 40ms,100Mbit --ready 'Listening on' \
      registry.example.com/app:v1 -- /app/server
  lazypull bench --modes full-pull,lazypull,stargz --snapshotter stargz=/run/containerd-stargz-grpc/containerd-stargz-grpc.sock \
      --wan none ghcr.io/me/app:esgz
  lazypull bench --preset hellobench --modes full-pull,lazypull,lazypull-optimized --wan 40ms,100Mbit --repeats 3`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runBench(cmd, args, &f)
		},
	}
	f.rf.add(cmd)
	fl := cmd.Flags()
	fl.StringVar(&f.ready, "ready", "", "regular expression of the output line that means \"started\" (default: the command's exit)")
	fl.StringVar(&f.modes, "modes", "", "comma-separated modes: full-pull, lazypull, lazypull-optimized, stargz-snapshotter, lazypull-second-node (runs lazypull-first-node before it), or a --snapshotter name; \"all\" for every built-in one (default full-pull,lazypull and every --snapshotter)")
	fl.StringArrayVar(&f.snapshotters, "snapshotter", nil, "another proxy snapshotter to measure, as NAME=SOCKET (repeatable); it pulls the lazypull mode's image")
	fl.StringArrayVar(&f.wans, "wan", []string{"none"}, "emulated link as RTT,BANDWIDTH (e.g. 40ms,100Mbit), or none (repeatable)")
	fl.IntVar(&f.repeats, "repeats", 1, "cold starts per mode and link (the median is reported)")
	fl.StringVar(&f.out, "out", "lazypull-bench", "directory for the report")
	fl.BoolVar(&f.convert, "convert", false, "convert the image to eStargz (into the loopback registry) first")
	fl.StringVar(&f.convertTo, "convert-to", "", "also write the converted image to this registry REF:TAG or oci-layout:DIR:TAG (the optimized one as TAG-optimized); with --wan none and a registry, the lazypull modes pull from there (implies --convert)")
	fl.StringVar(&f.platform, "platform", "", "platform of the image to measure (default: this host's)")
	fl.StringVar(&f.preset, "preset", "", "measure built-in images instead of IMAGE: hellobench (python, gcc, node, large) or hellobench:NAME,...")
	fl.BoolVar(&f.jsonOut, "json", false, "no progress; print the result as JSON on stdout")
	fl.DurationVar(&f.timeout, "timeout", 10*time.Minute, "how long a run may take to become ready")
	fl.StringVar(&f.snapshotterBin, "snapshotter-bin", "", "lazypull-snapshotter binary (default: next to lazypull, then $PATH)")
	fl.StringVar(&f.snapshotterCfg, "snapshotter-config", "", "TOML file with extra lazypull-snapshotter settings (e.g. [fetch])")
	fl.StringVar(&f.stargzBin, "stargz-bin", "", "stargz-snapshotter's containerd-stargz-grpc for the stargz-snapshotter mode (default: next to lazypull, $PATH, else built from bench/peer/stargz)")
	fl.StringVar(&f.stargzCfg, "stargz-config", "", "TOML file for containerd-stargz-grpc (default: its own defaults)")
	fl.StringVar(&f.cacheDir, "cache-dir", "/var/cache/lazypull-bench", "keeps built preset images and the loopback registry between runs")
	fl.StringVar(&f.name, "name", "", "name of IMAGE in the report (default: from the reference)")
	fl.StringVar(&f.from, "from", "", "write the report of an earlier results.json again instead of measuring")
	fl.StringVar(&f.convertCompare, "convert-compare", "", "instead of cold starts, time lazypull convert against ctr-remote on this preset image")
	_ = fl.MarkHidden("convert-compare")
	return cmd
}

func runBench(cmd *cobra.Command, args []string, f *benchFlags) error {
	ctx := cmd.Context()
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	// The loopback registry logs every request at info level.
	logrus.SetOutput(io.Discard)
	if f.from != "" {
		return rerender(f.from, f.out, stdout)
	}
	dash := cmd.ArgsLenAtDash()
	var image string
	var command []string
	switch {
	case dash >= 0:
		if dash > 1 {
			return usageError{fmt.Errorf("bench takes one IMAGE before --, got %d", dash)}
		}
		command = args[dash:]
		if dash == 1 {
			image = args[0]
		}
	case len(args) > 1:
		return usageError{fmt.Errorf("bench takes one IMAGE (put the command after --), got %d arguments", len(args))}
	case len(args) == 1:
		image = args[0]
	}
	if (image == "") == (f.preset == "" && f.convertCompare == "") {
		return usageError{errors.New("bench needs IMAGE or --preset, not both")}
	}
	if f.preset != "" && (len(command) > 0 || f.ready != "") {
		return usageError{errors.New("--preset images bring their own command and ready line")}
	}
	var ready *regexp.Regexp
	if f.ready != "" {
		re, err := regexp.Compile(f.ready)
		if err != nil {
			return usageError{fmt.Errorf("--ready %q: %w", f.ready, err)}
		}
		ready = re
	}
	profiles, err := parseWANs(f.wans)
	if err != nil {
		return err
	}
	proxies := map[string]string{}
	var proxyModes []bench.Mode
	for _, s := range f.snapshotters {
		name, sock, ok := strings.Cut(s, "=")
		if !ok || name == "" || sock == "" {
			return usageError{fmt.Errorf("--snapshotter %q: want NAME=SOCKET", s)}
		}
		for _, m := range bench.Modes {
			if name == string(m) || name == "overlayfs" {
				return usageError{fmt.Errorf("--snapshotter %q: %s is a built-in mode", s, name)}
			}
		}
		if _, dup := proxies[name]; dup {
			return usageError{fmt.Errorf("--snapshotter %s given twice", name)}
		}
		proxies[name] = sock
		proxyModes = append(proxyModes, bench.Mode(name))
	}
	modes, err := parseModes(f.modes, proxyModes)
	if err != nil {
		return err
	}
	var preset []images.Spec
	if f.preset != "" {
		if preset, err = parsePreset(f.preset); err != nil {
			return err
		}
	}
	if os.Geteuid() != 0 {
		return errors.New("bench must run as root: it runs containerd and mounts file systems")
	}
	snBin, err := findSnapshotter(f.snapshotterBin)
	if err != nil {
		return err
	}
	var peerBin, peerCfg string
	if slices.Contains(modes, bench.ModePeer) {
		if f.stargzCfg != "" {
			b, err := os.ReadFile(f.stargzCfg)
			if err != nil {
				return usageError{fmt.Errorf("--stargz-config: %w", err)}
			}
			peerCfg = string(b)
		}
		if peerBin, err = findPeer(ctx, f.stargzBin, f.cacheDir, stderr); err != nil {
			return err
		}
	}
	var snCfg string
	if f.snapshotterCfg != "" {
		b, err := os.ReadFile(f.snapshotterCfg)
		if err != nil {
			return usageError{fmt.Errorf("--snapshotter-config: %w", err)}
		}
		snCfg = string(b) + "\n"
		if strings.Contains(snCfg, "[metrics]") {
			return usageError{errors.New("--snapshotter-config: leave out [metrics]: the bench sets its address")}
		}
	}
	// The daemon reads registries the way this command does.
	if cmd.Flags().Changed("hosts-dir") && !strings.Contains(snCfg, "[registry]") {
		snCfg += fmt.Sprintf("[registry]\nhosts_dir = %q\n", f.rf.hostsDir)
	}
	reg, err := f.rf.registry()
	if err != nil {
		return err
	}
	log := stderr
	if f.jsonOut {
		log = io.Discard
	}
	cfg := bench.Config{
		Preset: preset, Profiles: profiles, Modes: modes, Proxies: proxies,
		Convert: f.convert || len(preset) > 0, ConvertTo: f.convertTo, Platform: f.platform, Repeats: f.repeats,
		ReadyTimeout: f.timeout, Limit: len(preset) > 0, CacheDir: f.cacheDir,
		Snapshotter: snBin, SnapshotterConfig: snCfg, Peer: peerBin, PeerConfig: peerCfg, Remote: reg, Log: log,
		Resolver: func() remotes.Resolver { return docker.NewResolver(f.rf.resolver(ctx)) },
	}
	if image != "" {
		cfg.Workloads = []bench.Workload{{Name: f.name, Source: image, Cmd: command, Ready: ready}}
	}
	if f.convertCompare != "" {
		specs, err := parsePreset("hellobench:" + f.convertCompare)
		if err != nil {
			return err
		}
		cfg.Preset = specs
		r, err := bench.NewRunner(cfg)
		if err != nil {
			return err
		}
		c, err := r.CompareConvert(ctx, specs[0])
		if err != nil {
			return err
		}
		if err := c.Write(f.out); err != nil {
			return err
		}
		c.Markdown(stdout)
		return nil
	}
	r, err := bench.NewRunner(cfg)
	if err != nil {
		return usageError{err}
	}
	res, err := r.Run(ctx)
	if err != nil {
		return err
	}
	if err := res.Write(f.out); err != nil {
		return fmt.Errorf("writing the report: %w", err)
	}
	if f.jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Fprint(stdout, res.Table())
	fmt.Fprintf(stdout, "report written to %s (report.html, results.md, results.json, *.svg)\n", f.out)
	return nil
}

// rerender writes the report of an earlier run again.
func rerender(from, out string, stdout io.Writer) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	var res bench.Result
	if err := json.Unmarshal(b, &res); err != nil {
		return fmt.Errorf("%s: %w", from, err)
	}
	if err := res.Write(out); err != nil {
		return err
	}
	fmt.Fprint(stdout, res.Table())
	return nil
}

// findSnapshotter returns the lazypull-snapshotter binary: the flag's,
// the one next to this executable, or the one on $PATH.
func findSnapshotter(flag string) (string, error) {
	if flag != "" {
		p, err := filepath.Abs(flag)
		if err != nil {
			return "", err
		}
		if _, err := os.Stat(p); err != nil {
			return "", usageError{fmt.Errorf("--snapshotter-bin: %w", err)}
		}
		return p, nil
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "lazypull-snapshotter")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath("lazypull-snapshotter")
	if err != nil {
		return "", errors.New("lazypull-snapshotter not found next to lazypull nor on $PATH (make build, or --snapshotter-bin)")
	}
	return filepath.Abs(p)
}

// findPeer returns stargz-snapshotter's daemon: the flag's, the one next
// to this executable, the one on $PATH, or else a build from the peer's
// module in the lazypull source tree around the working directory, kept
// in cacheDir.
func findPeer(ctx context.Context, flag, cacheDir string, log io.Writer) (string, error) {
	if flag != "" {
		p, err := filepath.Abs(flag)
		if err != nil {
			return "", err
		}
		if _, err := os.Stat(p); err != nil {
			return "", usageError{fmt.Errorf("--stargz-bin: %w", err)}
		}
		return p, nil
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), bench.PeerBinary)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath(bench.PeerBinary); err == nil {
		return filepath.Abs(p)
	}
	wd, _ := os.Getwd()
	mod := bench.FindPeerModule(wd)
	if mod == "" {
		return "", fmt.Errorf("%s not found (--stargz-bin, next to lazypull, $PATH) and no lazypull source tree here to build it from %s (make bench-peer)", bench.PeerBinary, bench.PeerModuleDir)
	}
	fmt.Fprintf(log, "bench: building stargz-snapshotter %s from %s\n", bench.PeerVersion, mod)
	p, err := bench.BuildPeer(ctx, mod, filepath.Join(cacheDir, "peer"))
	if err != nil {
		return "", fmt.Errorf("building stargz-snapshotter: %w", err)
	}
	return p, nil
}

// parseModes parses --modes; the default is the full pull, lazypull and
// every --snapshotter.
func parseModes(s string, proxies []bench.Mode) ([]bench.Mode, error) {
	if s == "" {
		return append([]bench.Mode{bench.ModeFull, bench.ModeLazy}, proxies...), nil
	}
	var out []bench.Mode
	for _, m := range strings.Split(s, ",") {
		m = strings.TrimSpace(m)
		switch {
		case m == "":
		case m == "all":
			out = append(out, bench.Modes...)
		default:
			out = append(out, bench.Mode(m))
		}
	}
	if len(out) == 0 {
		return nil, usageError{fmt.Errorf("--modes %q: no mode", s)}
	}
	return out, nil
}

// parsePreset parses "hellobench" or "hellobench:python,gcc".
func parsePreset(s string) ([]images.Spec, error) {
	name, list, _ := strings.Cut(s, ":")
	if name != "hellobench" {
		return nil, usageError{fmt.Errorf("--preset %q: the preset is hellobench", s)}
	}
	all := images.DefaultSpecs()
	if list == "" {
		return all, nil
	}
	var out []images.Spec
	for _, n := range strings.Split(list, ",") {
		found := false
		for _, sp := range all {
			if sp.Name == strings.TrimSpace(n) {
				out = append(out, sp)
				found = true
			}
		}
		if !found {
			var names []string
			for _, sp := range all {
				names = append(names, sp.Name)
			}
			return nil, usageError{fmt.Errorf("--preset: no image %q in hellobench (have %s)", n, strings.Join(names, ", "))}
		}
	}
	return out, nil
}

// parseWANs parses --wan values: "RTT,BANDWIDTH" or "none".
func parseWANs(vals []string) ([]wan.Profile, error) {
	var out []wan.Profile
	seen := map[string]bool{}
	for _, v := range vals {
		v = strings.TrimSpace(v)
		var p wan.Profile
		if v == bench.NoWAN {
			p = wan.Profile{Name: bench.NoWAN}
		} else {
			rtt, bw, ok := strings.Cut(v, ",")
			if !ok {
				return nil, usageError{fmt.Errorf("--wan %q: want RTT,BANDWIDTH (e.g. 40ms,100Mbit) or none", v)}
			}
			d, err := time.ParseDuration(strings.TrimSpace(rtt))
			if err != nil || d < 0 {
				return nil, usageError{fmt.Errorf("--wan %q: bad round-trip time %q", v, rtt)}
			}
			bits, err := parseBandwidth(strings.TrimSpace(bw))
			if err != nil {
				return nil, usageError{fmt.Errorf("--wan %q: %w", v, err)}
			}
			p = wan.Profile{Name: strings.TrimSpace(rtt) + "-" + strings.TrimSpace(bw), RTT: d, BitsPerSecond: bits}
		}
		if seen[p.Name] {
			return nil, usageError{fmt.Errorf("--wan %s given twice", p.Name)}
		}
		seen[p.Name] = true
		out = append(out, p)
	}
	if len(out) == 0 {
		return nil, usageError{errors.New("--wan: none given")}
	}
	return out, nil
}

// parseBandwidth parses "100Mbit", "1Gbit", "512kbit".
func parseBandwidth(s string) (int64, error) {
	l := strings.ToLower(s)
	mult := int64(1)
	switch {
	case strings.HasSuffix(l, "gbit"):
		mult, l = 1_000_000_000, strings.TrimSuffix(l, "gbit")
	case strings.HasSuffix(l, "mbit"):
		mult, l = 1_000_000, strings.TrimSuffix(l, "mbit")
	case strings.HasSuffix(l, "kbit"):
		mult, l = 1_000, strings.TrimSuffix(l, "kbit")
	default:
		return 0, fmt.Errorf("bandwidth %q needs a unit: kbit, Mbit or Gbit", s)
	}
	var n int64
	if _, err := fmt.Sscanf(l, "%d", &n); err != nil || n <= 0 || n > 1_000_000 {
		return 0, fmt.Errorf("bad bandwidth %q", s)
	}
	return n * mult, nil
}
