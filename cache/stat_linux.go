package cache

import (
	"os"

	"golang.org/x/sys/unix"
)

// statEntry returns the size of the regular file name in the directory dir
// and the later of its access and modification times in unix nanoseconds:
// the best record of its last use that survives a restart. Access times may
// lag (relatime, noatime); the store writes them itself for entries it serves
// (see persistUse). ok is false for anything but a regular file.
//
// fstatat relative to the open directory spares the kernel a path walk per
// file, which is most of the cost of Open on a large cache.
func statEntry(dir *os.File, name string) (size, time int64, ok bool, err error) {
	var st unix.Stat_t
	if err := unix.Fstatat(int(dir.Fd()), name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return 0, 0, false, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return 0, 0, false, nil
	}
	return st.Size, max(st.Atim.Nano(), st.Mtim.Nano()), true, nil
}
