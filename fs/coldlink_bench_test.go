package fs_test

// BenchmarkColdStartSlowLink: a cold start's read pattern on a freshly
// mounted layer whose registry is behind an emulated slow link (bench/wan:
// 40 ms RTT, 100 Mbit/s), through FUSE. The pattern imitates an
// import-heavy start-up: packages (directories of small files) are read in
// an order unrelated to the blob's, most of each package's files, with a
// little CPU work after each file, and now and then a few pages of a large
// shared library at scattered offsets.
//
//	go test -run '^$' -bench ColdStartSlowLink -benchtime 3x ./fs/
//
// Metrics per variant of the scheduler (median over iterations, each on a
// fresh store and mount):
//   - total-ms: the whole pattern, from the mount to the last read;
//   - limit-ms: the blob's size at link rate plus one round trip (what
//     streaming the whole layer would take);
//   - read-p50-ms, read-p90-ms, read-max-ms: each file read (open + read
//     of a small file, or one pread of a large one), which is what the
//     workload waits for;
//   - waits, wait-p50-ms: the reads that took at least half a round trip
//     (they waited for the link), and their median: a foreground request
//     delayed by speculation beside it shows here;
//   - fg-MB, bg-MB, requests: what crossed the link.

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/lazypull/lazypull/bench/wan"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
	"github.com/lazypull/lazypull/remote/remotetest"
)

const (
	coldPackages     = 40
	coldFilesPerPkg  = 24
	coldBigFiles     = 4
	coldBigSize      = 8 << 20
	coldChunkSize    = 256 << 10
	coldPkgsRead     = 18
	coldThink        = 300 * time.Microsecond
	coldPagesPerPeek = 4 << 10
)

// coldLayer builds the benchmark's layer: packages of small, half
// compressible files, then the large libraries.
func coldLayer(b *testing.B) ([]fixture.Entry, []string, []string) {
	rng := rand.New(rand.NewSource(11))
	var entries []fixture.Entry
	var pkgs, bigs []string
	entries = append(entries, fixture.Dir("lib", 0o755))
	for p := range coldPackages {
		dir := fmt.Sprintf("lib/pkg%02d", p)
		pkgs = append(pkgs, dir)
		entries = append(entries, fixture.Dir(dir, 0o755))
		for f := range coldFilesPerPkg {
			size := 2<<10 + rng.Intn(30<<10)
			data := make([]byte, size)
			rng.Read(data[:size/2]) // the rest zeros: compresses about 2x
			entries = append(entries, fixture.Reg(fmt.Sprintf("%s/m%02d.py", dir, f), 0o644, data))
		}
	}
	entries = append(entries, fixture.Dir("lib/big", 0o755))
	for i := range coldBigFiles {
		data := make([]byte, coldBigSize)
		rng.Read(data)
		name := fmt.Sprintf("lib/big/lib%d.so", i)
		bigs = append(bigs, name)
		entries = append(entries, fixture.Reg(name, 0o755, data))
	}
	return entries, pkgs, bigs
}

// coldVariant is one scheduler configuration.
type coldVariant struct {
	name  string
	sched func() *lfs.Scheduler
}

func BenchmarkColdStartSlowLink(b *testing.B) {
	entries, pkgs, bigs := coldLayer(b)
	bl := oursGzip.build(b, fixture.Tar(b, entries), coldChunkSize, nil)
	reg := remotetest.NewRegistry(b)
	profile := wan.Profile{Name: "40ms-100Mbit", RTT: 40 * time.Millisecond, BitsPerSecond: 100_000_000}
	px, err := wan.Listen("127.0.0.1:0", reg.Host(), profile)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { px.Close() })
	limit := time.Duration(float64(len(bl.data))/profile.BytesPerSecond()*float64(time.Second)) + profile.RTT

	for _, v := range coldVariants() {
		b.Run(v.name, func(b *testing.B) {
			var totals, p50s, p90s, maxs, misses, missP50s, fgs, bgs, reqs []float64
			for b.Loop() {
				b.StopTimer()
				e := newEnv(b, envOptions{reg: reg, manager: lfs.ManagerOptions{
					Layer: lfs.LayerOptions{Scheduler: v.sched()},
					Fetch: lfs.FetchOptions{Prefetch: true, Background: true},
				}})
				src := e.push(b, "cold", bl)
				src.Ref = px.Addr() + "/cold:latest"
				b.StartTimer()
				t0 := time.Now()
				dir, m := e.mount(b, src)
				lat := coldWorkload(b, dir, pkgs, bigs)
				total := time.Since(t0)
				b.StopTimer()
				st := m.Layer().Stats()
				unmount(b, e.mgr, dir)
				sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
				totals = append(totals, ms(total))
				p50s = append(p50s, ms(lat[len(lat)/2]))
				p90s = append(p90s, ms(lat[len(lat)*9/10]))
				maxs = append(maxs, ms(lat[len(lat)-1]))
				// Reads that waited for the link (at least half a round
				// trip): their latency is where speculation beside them
				// would show.
				waited := lat[sort.Search(len(lat), func(i int) bool { return lat[i] >= profile.RTT/2 }):]
				misses = append(misses, float64(len(waited)))
				if len(waited) > 0 {
					missP50s = append(missP50s, ms(waited[len(waited)/2]))
				}
				fgs = append(fgs, float64(st.FetchedBytes-st.BackgroundBytes)/1e6)
				bgs = append(bgs, float64(st.BackgroundBytes)/1e6)
				reqs = append(reqs, float64(st.Requests))
				b.StartTimer()
			}
			b.ReportMetric(median(totals), "total-ms")
			b.ReportMetric(ms(limit), "limit-ms")
			b.ReportMetric(median(p50s), "read-p50-ms")
			b.ReportMetric(median(p90s), "read-p90-ms")
			b.ReportMetric(median(maxs), "read-max-ms")
			b.ReportMetric(median(misses), "waits")
			if len(missP50s) > 0 {
				b.ReportMetric(median(missP50s), "wait-p50-ms")
			}
			b.ReportMetric(median(fgs), "fg-MB")
			b.ReportMetric(median(bgs), "bg-MB")
			b.ReportMetric(median(reqs), "requests")
		})
	}
}

// coldWorkload runs the read pattern on the layer mounted at dir and
// returns the duration of each read.
func coldWorkload(b *testing.B, dir string, pkgs, bigs []string) []time.Duration {
	rng := rand.New(rand.NewSource(5))
	order := rng.Perm(len(pkgs))[:coldPkgsRead]
	var lat []time.Duration
	page := make([]byte, coldPagesPerPeek)
	for k, p := range order {
		files, err := os.ReadDir(filepath.Join(dir, pkgs[p]))
		if err != nil {
			b.Fatal(err)
		}
		for _, f := range files {
			if rng.Intn(10) >= 6 {
				continue // 60% of a package's files are imported
			}
			t0 := time.Now()
			if _, err := os.ReadFile(filepath.Join(dir, pkgs[p], f.Name())); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(t0))
			think(coldThink)
		}
		if k%4 == 3 {
			// A few pages of a large library, at scattered offsets.
			big := bigs[rng.Intn(len(bigs))]
			fd, err := os.Open(filepath.Join(dir, big))
			if err != nil {
				b.Fatal(err)
			}
			for range 3 {
				off := rng.Int63n(coldBigSize - int64(len(page)))
				t0 := time.Now()
				if _, err := fd.ReadAt(page, off); err != nil {
					fd.Close()
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
				think(coldThink)
			}
			fd.Close()
		}
	}
	return lat
}

// think burns CPU for d, as a program does between reads.
func think(d time.Duration) {
	for t0 := time.Now(); time.Since(t0) < d; {
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}
