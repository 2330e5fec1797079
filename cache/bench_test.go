package cache

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

const benchChunk = 4 << 20 // the eStargz default chunk size

// readSizes are a small read and FUSE's usual max_read.
var readSizes = []int{4 << 10, 128 << 10}

func benchReadAt(b *testing.B, s *Store, d digest.Digest) {
	for _, size := range readSizes {
		offsets := benchChunk / size
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			p := make([]byte, size)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, err := s.ReadAt(d, p, int64(i%offsets*size)); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
		b.Run(fmt.Sprintf("%dKiB-parallel", size>>10), func(b *testing.B) {
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				p := make([]byte, size)
				i := 0
				for pb.Next() {
					if _, err := s.ReadAt(d, p, int64(i%offsets*size)); err != nil {
						b.Error(err)
						return
					}
					i++
				}
			})
		})
	}
}

// BenchmarkReadAtMemoryHit reads a 4 MiB chunk held in the memory tier.
func BenchmarkReadAtMemoryHit(b *testing.B) {
	s := open(b, Options{Dir: b.TempDir(), MaxMemoryBytes: 64 << 20})
	d, data := entry(1, benchChunk)
	mustAdd(b, s, d, data)
	benchReadAt(b, s, d)
}

// BenchmarkReadAtDiskHit reads a verified 4 MiB chunk from the disk tier
// (page cache warm), through the descriptor cache.
func BenchmarkReadAtDiskHit(b *testing.B) {
	s := open(b, Options{Dir: b.TempDir(), MaxMemoryBytes: -1})
	d, data := entry(1, benchChunk)
	mustAdd(b, s, d, data)
	benchReadAt(b, s, d)
}

// BenchmarkAdd stores new 4 MiB chunks in both tiers, at steady state: the
// disk tier is kept at 256 MiB, so each Add also evicts an entry.
func BenchmarkAdd(b *testing.B) {
	for _, size := range []int{64 << 10, benchChunk} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			s := open(b, Options{Dir: b.TempDir(), MaxDiskBytes: 256 << 20})
			_, data := entry(1, size)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			var i uint64
			for b.Loop() {
				// Add trusts its caller, so a distinct digest per
				// iteration does not need distinct data.
				var buf [8]byte
				binary.LittleEndian.PutUint64(buf[:], i)
				if err := s.Add(digest.FromBytes(buf[:]), data); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

// BenchmarkAddSmallParallel stores new small chunks (a small file's
// single chunk, the common case of an import-heavy start-up) from
// parallel goroutines, as concurrent fetches do. It reports the CPU
// time (user+system, of the whole process) per Add, which is what a cold
// start pays for the disk tier.
func BenchmarkAddSmallParallel(b *testing.B) {
	for _, size := range []int{4 << 10, 32 << 10} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			s := open(b, Options{Dir: b.TempDir(), MaxDiskBytes: 256 << 20})
			_, data := entry(1, size)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			var next atomic.Uint64
			cpu0 := processCPU(b)
			b.RunParallel(func(pb *testing.PB) {
				var buf [8]byte
				for pb.Next() {
					binary.LittleEndian.PutUint64(buf[:], next.Add(1))
					if err := s.Add(digest.FromBytes(buf[:]), data); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
		})
	}
}

// processCPU is the process's user+system CPU time so far.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkGetMemoryHit returns a shared memory tier buffer.
func BenchmarkGetMemoryHit(b *testing.B) {
	s := open(b, Options{})
	var ds []digest.Digest
	for i := range 64 {
		d, data := entry(i, 64<<10)
		mustAdd(b, s, d, data)
		ds = append(ds, d)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := s.Get(ds[i%len(ds)]); err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
}

// BenchmarkOpen measures indexing an existing cache of 20k entries at
// start-up (names and sizes only; no content is read), with a file per
// entry and packed (index files read; none missing).
func BenchmarkOpen(b *testing.B) {
	b.Run("files", func(b *testing.B) { benchOpen(b, 0) })
	b.Run("packed", func(b *testing.B) { benchOpen(b, DefaultPackMaxEntry) })
}

func benchOpen(b *testing.B, packMax int64) {
	dir := b.TempDir()
	s, err := Open(Options{Dir: dir, MaxMemoryBytes: -1, MaxDiskBytes: -1, PackMaxEntry: packMax})
	if err != nil {
		b.Fatal(err)
	}
	for i := range 20000 {
		data := []byte(fmt.Sprintf("entry %d", i))
		if err := s.Add(digest.FromBytes(data), data); err != nil {
			b.Fatal(err)
		}
	}
	s.Close()
	b.ResetTimer()
	for range b.N {
		s, err := Open(Options{Dir: dir, MaxMemoryBytes: -1, MaxDiskBytes: -1})
		if err != nil {
			b.Fatal(err)
		}
		s.Close()
	}
}

// BenchmarkAddFilesVsPacked stores new chunks of typical sizes in the disk
// tier alone (memory tier off), from parallel goroutines as concurrent
// fetches do, once with a file per entry and once appended to packs, at
// steady state (a 256 MiB tier that evicts, and for packs compacts, as it
// goes). cpu-us/op is the process's CPU time per Add.
func BenchmarkAddFilesVsPacked(b *testing.B) {
	for _, size := range []int{4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20} {
		for _, mode := range []struct {
			name    string
			packMax int64
		}{{"files", 0}, {"packed", DefaultPackMaxEntry}} {
			b.Run(fmt.Sprintf("%dKiB/%s", size>>10, mode.name), func(b *testing.B) {
				s := open(b, Options{Dir: b.TempDir(), MaxDiskBytes: 256 << 20, MaxMemoryBytes: -1, PackMaxEntry: mode.packMax})
				_, data := entry(1, size)
				b.SetBytes(int64(size))
				b.ReportAllocs()
				var next atomic.Uint64
				cpu0 := processCPU(b)
				b.RunParallel(func(pb *testing.PB) {
					var buf [8]byte
					for pb.Next() {
						binary.LittleEndian.PutUint64(buf[:], next.Add(1))
						if err := s.Add(digest.FromBytes(buf[:]), data); err != nil {
							b.Error(err)
							return
						}
					}
				})
				b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
			})
		}
	}
}
