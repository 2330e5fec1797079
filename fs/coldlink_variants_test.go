package fs_test

import lfs "github.com/lazypull/lazypull/fs"

// coldVariants are the scheduler configurations BenchmarkColdStartSlowLink
// compares: "before" is the engine before speculation (read-ahead in a
// second foreground request, speculation only after a quiet period),
// "before+lane" that read path with the default busy lane, "no-lane" the
// speculation queue without a busy lane, "lane-SxN" with a lane of N
// requests of S, and "default" the defaults (128 KiB x 4).
func coldVariants() []coldVariant {
	lane := func(size int64, depth int) func() *lfs.Scheduler {
		return func() *lfs.Scheduler {
			return lfs.NewScheduler(lfs.DefaultMaxBackground, lfs.WithBusyBackground(size), lfs.WithBusyDepth(depth))
		}
	}
	return []coldVariant{
		{"before", func() *lfs.Scheduler {
			return lfs.NewScheduler(lfs.DefaultMaxBackground, lfs.WithBusyBackground(0), lfs.WithForegroundReadAhead())
		}},
		{"before+lane", func() *lfs.Scheduler {
			return lfs.NewScheduler(lfs.DefaultMaxBackground, lfs.WithForegroundReadAhead())
		}},
		{"no-lane", lane(0, 1)},
		{"lane-256Kx1", lane(256<<10, 1)},
		{"lane-256Kx2", lane(256<<10, 2)},
		{"lane-64Kx8", lane(64<<10, 8)},
		{"default", func() *lfs.Scheduler { return lfs.NewScheduler(lfs.DefaultMaxBackground) }},
	}
}
