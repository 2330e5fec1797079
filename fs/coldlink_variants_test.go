package fs_test

import lfs "github.com/lazypull/lazypull/fs"

// coldVariants are the scheduler configurations BenchmarkColdStartSlowLink
// compares.
func coldVariants() []coldVariant {
	return []coldVariant{
		{"quiet-only", func() *lfs.Scheduler { return lfs.NewScheduler(1, lfs.WithBusyBackground(0)) }},
		{"busy-256K", func() *lfs.Scheduler { return lfs.NewScheduler(1, lfs.WithBusyBackground(256<<10)) }},
	}
}
