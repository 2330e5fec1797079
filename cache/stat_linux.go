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

// fileTime is statEntry's time for an open file: the later of its access
// and modification times, in unix nanoseconds.
func fileTime(f *os.File) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, err
	}
	return max(st.Atim.Nano(), st.Mtim.Nano()), nil
}

// writeAtv writes bufs back to back at off with one pwritev(2). A short
// write is completed with further calls.
func writeAtv(f *os.File, bufs [][]byte, off int64) error {
	var total int
	for _, b := range bufs {
		total += len(b)
	}
	n, err := unix.Pwritev(int(f.Fd()), bufs, off)
	if err != nil {
		return &os.PathError{Op: "pwritev", Path: f.Name(), Err: err}
	}
	if n == total {
		return nil
	}
	// Rare (a signal, a nearly full disk): finish with plain writes.
	for _, b := range bufs {
		if n >= len(b) {
			n -= len(b)
			off += int64(len(b))
			continue
		}
		if _, err := f.WriteAt(b[n:], off+int64(n)); err != nil {
			return err
		}
		off += int64(len(b))
		n = 0
	}
	return nil
}
