package fs_test

// Benchmarks of a fully cached layer (every chunk in the store) mounted
// through FUSE, with and without passthrough, against the same tree
// extracted on the local disk. Every pass starts with a cold page cache
// (and cold dentry/inode caches): echo 3 > /proc/sys/vm/drop_caches, so
// FUSE reads reach the daemon (FOPEN_KEEP_CACHE would otherwise serve
// repeated reads from the page cache) and local reads reach the disk. The
// chunk store stays warm: its memory tier keeps what it holds, its disk
// tier is read from the disk like the local tree.
//
//	go test -run '^$' -bench CachedLayer -benchtime 3x ./fs/
//
// Each sub-benchmark reports the rate of each variant and the ratios
// fuse/local and passthrough/local (1 means as fast as the local disk).

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/cache"
	"github.com/lazypull/lazypull/estargz"
	lfs "github.com/lazypull/lazypull/fs"
	"github.com/lazypull/lazypull/internal/fixture"
)

const (
	benchSmallFiles = 2000
	benchDirs       = 40
	benchLargeFiles = 4
	benchLargeSize  = 44 << 20
)

// benchTree is the benchmark's layer: mounted plain and with passthrough,
// and extracted locally.
type benchTree struct {
	work                     string
	mounts                   []*lfs.Mount
	store                    *cache.Store
	local, fuse, passthrough string
	large, small, dirs       []string // relative paths
	all                      []string // every path, for stat
	bytes                    int64
}

var (
	benchOnce  sync.Once
	benchState *benchTree
	benchErr   error
)

// benchLayer builds the tree once per process; TestMain tears it down.
func benchLayer(b *testing.B) *benchTree {
	benchOnce.Do(func() { benchState, benchErr = buildBench(b) })
	if benchErr != nil {
		b.Fatal(benchErr)
	}
	return benchState
}

func buildBench(b *testing.B) (*benchTree, error) {
	t0 := time.Now()
	work, err := os.MkdirTemp("", "lazypull-bench-")
	if err != nil {
		return nil, err
	}
	bt := &benchTree{work: work, local: filepath.Join(work, "local")}
	benchState = bt // for the teardown, also when building fails
	rng := rand.New(rand.NewSource(1))
	entries := []fixture.Entry{fixture.Dir("./", 0o755)}
	for d := range benchDirs {
		dir := fmt.Sprintf("d%02d", d)
		entries = append(entries, fixture.Dir(dir+"/", 0o755))
		bt.dirs = append(bt.dirs, dir)
	}
	for i := range benchSmallFiles {
		// 512 B to 64 KiB, log-uniform: ~12 KiB on average.
		size := int(512 * pow2(rng.Float64()*7))
		p := fmt.Sprintf("d%02d/file-%04d.txt", i%benchDirs, i)
		data := fixture.Text(int64(i), size)
		entries = append(entries, fixture.Reg(p, 0o644, data))
		bt.small = append(bt.small, p)
		bt.bytes += int64(size)
	}
	entries = append(entries, fixture.Dir("large/", 0o755))
	bt.dirs = append(bt.dirs, "large", ".")
	for i := range benchLargeFiles {
		p := fmt.Sprintf("large/blob-%d", i)
		// Half random, half text: compresses like a typical binary.
		data := append(fixture.Random(int64(1000+i), benchLargeSize/2), fixture.Text(int64(2000+i), benchLargeSize/2)...)
		entries = append(entries, fixture.Reg(p, 0o755, data))
		bt.large = append(bt.large, p)
		bt.bytes += benchLargeSize
	}
	for _, e := range entries {
		p := fixture.Clean(e.Header.Name)
		bt.all = append(bt.all, p)
		full := filepath.Join(bt.local, p)
		if e.Header.Typeflag == '5' {
			if err := os.MkdirAll(full, 0o755); err != nil {
				return nil, err
			}
			continue
		}
		if err := os.WriteFile(full, e.Data, 0o644); err != nil {
			return nil, err
		}
	}
	tarBytes := fixture.Tar(b, entries)
	blobPath := filepath.Join(work, "layer.esgz")
	f, err := os.Create(blobPath)
	if err != nil {
		return nil, err
	}
	if _, err := estargz.Build(context.Background(), f, bytes.NewReader(tarBytes), estargz.BuildOptions{Level: 1}); err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	store, err := cache.Open(cache.Options{Dir: filepath.Join(work, "cache"), MaxDiskBytes: 1 << 30})
	if err != nil {
		return nil, err
	}
	bt.store = store
	for _, v := range []struct {
		dir *string
		pt  bool
	}{{&bt.fuse, false}, {&bt.passthrough, true}} {
		l, _, err := lfs.OpenLocalLayer(blobPath, store, lfs.LayerOptions{})
		if err != nil {
			return nil, err
		}
		l.StartFetching(context.Background(), lfs.FetchOptions{Background: true})
		l.WaitFetching()
		if cached, total := l.Cached(); cached != total {
			return nil, fmt.Errorf("only %d of %d chunks cached", cached, total)
		}
		*v.dir = filepath.Join(work, fmt.Sprintf("mnt-pt=%v", v.pt))
		if err := os.Mkdir(*v.dir, 0o755); err != nil {
			return nil, err
		}
		m, err := lfs.MountLayer(*v.dir, l, lfs.MountOptions{Passthrough: v.pt})
		if err != nil {
			return nil, err
		}
		bt.mounts = append(bt.mounts, m)
	}
	unix.Sync()
	b.Logf("bench tree: %d files, %d MiB, built in %v", len(bt.all), bt.bytes>>20, time.Since(t0).Round(time.Millisecond))
	return bt, nil
}

// TestMain unmounts and removes the benchmark tree, if one was built.
func TestMain(m *testing.M) {
	code := m.Run()
	if bt := benchState; bt != nil {
		for _, mnt := range bt.mounts {
			if err := mnt.Unmount(); err != nil {
				fmt.Fprintln(os.Stderr, err)
				code = 1
			}
		}
		if bt.store != nil {
			bt.store.Close()
		}
		os.RemoveAll(bt.work)
	}
	os.Exit(code)
}

func pow2(x float64) float64 {
	r := 1.0
	for ; x >= 1; x-- {
		r *= 2
	}
	return r * (1 + x) // close enough to 2^x for spreading sizes
}

func dropCaches(b *testing.B) {
	// Dirty pages survive drop_caches: write them back first, or files
	// written by an earlier pass (the local tree, whole-file cache
	// entries) would be read from memory.
	syscall.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		b.Fatalf("dropping caches: %v", err)
	}
}

// benchPasses runs pass over each variant b.N times, each from a cold page
// cache, and reports unit/s per variant and the ratios to local.
func benchPasses(b *testing.B, unit string, pass func(root string) (float64, error)) {
	bt := benchLayer(b)
	variants := []struct{ name, root string }{{"local", bt.local}, {"fuse", bt.fuse}, {"pt", bt.passthrough}}
	amount := make([]float64, len(variants))
	took := make([]time.Duration, len(variants))
	b.ResetTimer()
	for range b.N {
		for i, v := range variants {
			dropCaches(b)
			t0 := time.Now()
			n, err := pass(v.root)
			took[i] += time.Since(t0)
			if err != nil {
				b.Fatalf("%s: %v", v.name, err)
			}
			amount[i] += n
		}
	}
	b.StopTimer()
	rate := make([]float64, len(variants))
	for i, v := range variants {
		rate[i] = amount[i] / took[i].Seconds()
		b.ReportMetric(rate[i], v.name+"-"+unit+"/s")
	}
	b.ReportMetric(rate[1]/rate[0], "fuse/local")
	b.ReportMetric(rate[2]/rate[0], "pt/local")
}

func BenchmarkCachedLayer(b *testing.B) {
	b.Run("SeqRead", func(b *testing.B) {
		bt := benchLayer(b)
		buf := make([]byte, 1<<20)
		benchPasses(b, "MB", func(root string) (float64, error) {
			total := 0
			for _, p := range bt.large {
				f, err := os.Open(filepath.Join(root, p))
				if err != nil {
					return 0, err
				}
				for {
					n, err := f.Read(buf)
					total += n
					if err == io.EOF {
						break
					}
					if err != nil {
						f.Close()
						return 0, err
					}
				}
				f.Close()
			}
			if total != benchLargeFiles*benchLargeSize {
				return 0, fmt.Errorf("read %d bytes", total)
			}
			return float64(total) / 1e6, nil
		})
	})
	b.Run("RandRead4K", func(b *testing.B) {
		bt := benchLayer(b)
		benchPasses(b, "reads", func(root string) (float64, error) {
			rng := rand.New(rand.NewSource(2))
			var files []*os.File
			for _, p := range bt.large {
				f, err := os.Open(filepath.Join(root, p))
				if err != nil {
					return 0, err
				}
				defer f.Close()
				files = append(files, f)
			}
			buf := make([]byte, 4096)
			const reads = 4000
			for range reads {
				off := rng.Int63n(benchLargeSize/4096) * 4096
				if _, err := files[rng.Intn(len(files))].ReadAt(buf, off); err != nil {
					return 0, err
				}
			}
			return reads, nil
		})
	})
	b.Run("SmallFiles", func(b *testing.B) {
		bt := benchLayer(b)
		benchPasses(b, "files", func(root string) (float64, error) {
			for _, p := range bt.small {
				if _, err := os.ReadFile(filepath.Join(root, p)); err != nil {
					return 0, err
				}
			}
			return float64(len(bt.small)), nil
		})
	})
	b.Run("Stat", func(b *testing.B) {
		bt := benchLayer(b)
		benchPasses(b, "stats", func(root string) (float64, error) {
			var st unix.Stat_t
			for _, p := range bt.all {
				if err := unix.Lstat(filepath.Join(root, p), &st); err != nil {
					return 0, err
				}
			}
			return float64(len(bt.all)), nil
		})
	})
	b.Run("Readdir", func(b *testing.B) {
		bt := benchLayer(b)
		benchPasses(b, "entries", func(root string) (float64, error) {
			n := 0
			for _, d := range bt.dirs {
				es, err := os.ReadDir(filepath.Join(root, d))
				if err != nil {
					return 0, err
				}
				n += len(es)
			}
			return float64(n), nil
		})
	})
}
