//go:build !linux

package cache

import (
	"os"
	"path/filepath"
)

// statEntry returns the size and modification time (unix nanoseconds) of the
// regular file name in the directory dir; ok is false for anything else.
func statEntry(dir *os.File, name string) (size, time int64, ok bool, err error) {
	fi, err := os.Lstat(filepath.Join(dir.Name(), name))
	if err != nil || !fi.Mode().IsRegular() {
		return 0, 0, false, err
	}
	return fi.Size(), fi.ModTime().UnixNano(), true, nil
}

// fileTime returns an open file's modification time in unix nanoseconds.
func fileTime(f *os.File) (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.ModTime().UnixNano(), nil
}

// writeAtv writes bufs back to back at off.
func writeAtv(f *os.File, bufs [][]byte, off int64) error {
	for _, b := range bufs {
		if _, err := f.WriteAt(b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}
