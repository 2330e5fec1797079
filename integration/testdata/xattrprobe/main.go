// Command xattrprobe prints, for each NAME after PATH, the value of that
// extended attribute of PATH or ENODATA. It runs inside test containers,
// whose busybox has no getfattr.
package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: xattrprobe PATH NAME...")
		os.Exit(2)
	}
	var out []string
	for _, name := range os.Args[2:] {
		buf := make([]byte, 4096)
		n, err := syscall.Getxattr(os.Args[1], name, buf)
		switch {
		case errors.Is(err, syscall.ENODATA):
			out = append(out, "ENODATA")
		case err != nil:
			out = append(out, "error:"+err.Error())
		default:
			out = append(out, string(buf[:n]))
		}
	}
	fmt.Println(strings.Join(out, " "))
}
