package fs_test

import lfs "github.com/lazypull/lazypull/fs"

// coldVariants are the scheduler configurations BenchmarkColdStartSlowLink
// compares: "before" is the engine before speculation (read-ahead in a
// second foreground request, speculation only after a quiet period),
// "before-lane-256K" that read path with today's busy lane (one request),
// "no-lane" the speculation queue without a busy lane, "lane-256Kx1" with
// a lane of one 256 KiB request, "default" the defaults (two), and
// "default-max2" two background requests once quiet.
func coldVariants() []coldVariant {
	return []coldVariant{
		{"before", func() *lfs.Scheduler {
			return lfs.NewScheduler(1, lfs.WithBusyBackground(0), lfs.WithForegroundReadAhead())
		}},
		{"before-lane-256K", func() *lfs.Scheduler {
			return lfs.NewScheduler(1, lfs.WithBusyBackground(256<<10), lfs.WithForegroundReadAhead())
		}},
		{"no-lane", func() *lfs.Scheduler { return lfs.NewScheduler(1, lfs.WithBusyBackground(0)) }},
		{"lane-128Kx4", func() *lfs.Scheduler {
			return lfs.NewScheduler(1, lfs.WithBusyBackground(128<<10), lfs.WithBusyDepth(4))
		}},
		{"lane-256Kx1", func() *lfs.Scheduler { return lfs.NewScheduler(1, lfs.WithBusyDepth(1)) }},
		{"default", func() *lfs.Scheduler { return lfs.NewScheduler(lfs.DefaultMaxBackground) }},
		{"default-max2", func() *lfs.Scheduler { return lfs.NewScheduler(2) }},
	}
}
