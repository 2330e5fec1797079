// Command lazypull-bench measures cold starts of containers over an
// emulated WAN: a full pull with overlayfs against lazypull with plain and
// optimized eStargz images, each against the image's lower limit. It
// builds its images from Debian packages (cached), runs a registry, a WAN
// emulator and private containerd and lazypull-snapshotter instances, and
// writes JSON, Markdown and SVG charts.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/lazypull/lazypull/bench"
	"github.com/lazypull/lazypull/bench/images"
	"github.com/lazypull/lazypull/bench/wan"
)

func main() {
	var (
		imageList   = flag.String("images", "python,gcc,node,large", "comma-separated images to measure: "+names())
		profileList = flag.String("profiles", "40ms-100Mbit,2ms-1Gbit", "comma-separated WAN profiles: RTT-bandwidth, e.g. 40ms-100Mbit")
		repeats     = flag.Int("repeats", 3, "cold starts per image, mode and profile (the median is reported)")
		out         = flag.String("out", "docs/benchmarks", "directory for results.json, results.md and charts")
		cacheDir    = flag.String("cache-dir", "/var/cache/lazypull-bench", "keeps built images and the registry between runs")
		snapshotter = flag.String("snapshotter", "bin/lazypull-snapshotter", "lazypull-snapshotter binary")
		modeList    = flag.String("modes", "", "comma-separated modes (default all): full-pull, lazypull, lazypull-optimized")
		from        = flag.String("from", "", "render the report from this results.json instead of measuring")
		convertCmp  = flag.String("convert-compare", "", "instead of cold starts, time `lazypull convert` against `ctr-remote image convert` on this image")
	)
	flag.Parse()
	// The in-process registry logs every request at info level.
	logrus.SetOutput(io.Discard)
	if *from != "" {
		if err := rerender(*from, *out); err != nil {
			fmt.Fprintln(os.Stderr, "lazypull-bench:", err)
			os.Exit(1)
		}
		return
	}
	if *convertCmp != "" {
		if err := compareConvert(*convertCmp, *out, *cacheDir, *snapshotter); err != nil {
			fmt.Fprintln(os.Stderr, "lazypull-bench:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(*imageList, *profileList, *modeList, *repeats, *out, *cacheDir, *snapshotter); err != nil {
		fmt.Fprintln(os.Stderr, "lazypull-bench:", err)
		os.Exit(1)
	}
}

func compareConvert(image, out, cacheDir, snapshotter string) error {
	specs, err := pickImages(image)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r, err := bench.NewRunner(bench.Config{Images: specs, CacheDir: cacheDir, Snapshotter: snapshotter, Log: os.Stderr})
	if err != nil {
		return err
	}
	c, err := r.CompareConvert(ctx, specs[0])
	if err != nil {
		return err
	}
	if err := c.Write(out); err != nil {
		return err
	}
	c.Markdown(os.Stdout)
	return nil
}

// rerender writes the report of an earlier run again.
func rerender(from, out string) error {
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
	fmt.Println(res.Table())
	return nil
}

func names() string {
	var n []string
	for _, s := range images.DefaultSpecs() {
		n = append(n, s.Name)
	}
	return strings.Join(n, ", ")
}

func run(imageList, profileList, modeList string, repeats int, out, cacheDir, snapshotter string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("must run as root (it mounts file systems and runs containerd)")
	}
	specs, err := pickImages(imageList)
	if err != nil {
		return err
	}
	profiles, err := parseProfiles(profileList)
	if err != nil {
		return err
	}
	var modes []bench.Mode
	for _, m := range splitList(modeList) {
		modes = append(modes, bench.Mode(m))
	}
	abs, err := filepath.Abs(snapshotter)
	if err != nil {
		return err
	}
	if _, err := os.Stat(abs); err != nil {
		return fmt.Errorf("snapshotter binary %s: %w (run make build)", abs, err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r, err := bench.NewRunner(bench.Config{
		Images: specs, Profiles: profiles, Modes: modes, Repeats: repeats,
		CacheDir: cacheDir, Snapshotter: abs, Log: os.Stderr,
	})
	if err != nil {
		return err
	}
	res, err := r.Run(ctx)
	if err != nil {
		return err
	}
	if err := res.Write(out); err != nil {
		return err
	}
	fmt.Println(res.Table())
	fmt.Printf("results written to %s (results.md, results.json, cold-start-*.svg)\n", out)
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, x := range strings.Split(s, ",") {
		if x = strings.TrimSpace(x); x != "" {
			out = append(out, x)
		}
	}
	return out
}

func pickImages(list string) ([]images.Spec, error) {
	all := images.DefaultSpecs()
	var out []images.Spec
	for _, name := range splitList(list) {
		found := false
		for _, s := range all {
			if s.Name == name {
				out = append(out, s)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("-images: unknown image %q (have %s)", name, names())
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("-images: none given")
	}
	return out, nil
}

// parseProfiles parses "40ms-100Mbit,2ms-1Gbit".
func parseProfiles(list string) ([]wan.Profile, error) {
	var out []wan.Profile
	for _, p := range splitList(list) {
		rtt, bw, ok := strings.Cut(p, "-")
		if !ok {
			return nil, fmt.Errorf("-profiles: %q is not RTT-bandwidth (e.g. 40ms-100Mbit)", p)
		}
		d, err := time.ParseDuration(rtt)
		if err != nil || d < 0 {
			return nil, fmt.Errorf("-profiles: %q: bad round-trip time %q", p, rtt)
		}
		bits, err := parseBandwidth(bw)
		if err != nil {
			return nil, fmt.Errorf("-profiles: %q: %w", p, err)
		}
		out = append(out, wan.Profile{Name: p, RTT: d, BitsPerSecond: bits})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("-profiles: none given")
	}
	return out, nil
}

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
	if _, err := fmt.Sscanf(l, "%d", &n); err != nil || n <= 0 {
		return 0, fmt.Errorf("bad bandwidth %q", s)
	}
	return n * mult, nil
}
