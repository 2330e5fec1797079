package fstest

import (
	"fmt"
	"strings"
	"time"
)

// Times used by RichLayer.
var (
	// SubSecond has nanoseconds.
	SubSecond = time.Date(2024, 2, 29, 12, 34, 56, 123456789, time.UTC)
	// Old is in 1971.
	Old = time.Date(1971, 2, 3, 4, 5, 6, 0, time.UTC)
	// PreEpoch is before 1970.
	PreEpoch = time.Date(1969, 7, 20, 20, 17, 40, 0, time.UTC)
)

// Paths in RichLayer worth naming in tests.
const (
	// RichMulti is a multi-chunk random file with xattrs and two
	// hardlinks (RichMultiLinks).
	RichMulti = "data/multi"
	// RichLarge is a 1 MiB + 17 random file.
	RichLarge = "data/large"
	// RichText is a compressible multi-chunk file.
	RichText = "data/text"
	// RichExact is exactly one chunk long.
	RichExact = "data/chunk"
	// RichSmall is a short text file.
	RichSmall = "bin/setuid"
	// RichWhiteout is the device a whiteout entry becomes.
	RichWhiteout = "wh/gone"
	// RichOpaque is an opaque directory.
	RichOpaque = "wh/opq"
)

// RichMultiLinks are the hardlinks to RichMulti.
var RichMultiLinks = []string{"data/multi-link", "bin/multi-link2"}

// LongName is a 255-byte file name.
var LongName = strings.Repeat("n", 250) + ".long"

// DeepDir is a directory path longer than a ustar name field.
var DeepDir = "deep/" + strings.Repeat("a", 60) + "/" + strings.Repeat("b", 60) + "/c"

// RichLayer is a layer with every kind of entry, for files split into
// chunkSize pieces: directories (setgid, sticky, implicit), regular files
// (empty, one byte, chunkSize-1, exactly chunkSize, chunkSize+1, several
// chunks, 1 MiB, compressible and not, mode 0, setuid, setgid), hardlinks
// (to a multi-chunk file, to an empty file, to a device), symlinks
// (relative, absolute, dangling, 200-byte target, with an xattr), character
// and block devices (minor > 255, major > 255), fifos, user.* and trusted.*
// xattrs (binary, 3000-byte values), owners from 0 to 300000, sub-second,
// 1971 and pre-1970 mtimes, a 255-byte name below a path longer than 100
// bytes, a directory of 300 entries, names that look like but are not
// whiteouts, whiteouts (also of a name the layer has) and an opaque
// directory.
func RichLayer(chunkSize int) []Entry {
	cs := chunkSize
	e := []Entry{
		Dir("./", 0o755).At(SubSecond),
		Dir("bin/", 0o755),
		Reg("bin/empty", 0o644, nil),
		Reg("bin/one", 0o755, []byte("1")),
		Reg(RichSmall, 0o4755, Text(1, 300)),
		Reg("bin/setgid", 0o2711, Text(2, 100)).Own(0, 50),
		Reg("bin/noperm", 0, Text(3, 10)),
		Dir("data/", 0o750).Own(1000, 1000).At(Old),
		Reg("data/chunk-minus-1", 0o600, Random(4, cs-1)).Own(1000, 1000),
		Reg(RichExact, 0o644, Random(5, cs)),
		Reg("data/chunk-plus-1", 0o644, Random(6, cs+1)),
		Reg("data/three", 0o644, Random(7, 3*cs)),
		Reg(RichMulti, 0o640, Random(8, 10*cs+123)).Own(1000, 1000).At(SubSecond).
			X("user.checksum", "abc").X("trusted.md5", "\x00\x01bin"),
		Reg(RichText, 0o644, Text(9, 40*cs+7)),
		Reg(RichLarge, 0o644, Random(10, 1<<20+17)),
		Hardlink(RichMultiLinks[0], RichMulti),
		Hardlink(RichMultiLinks[1], RichMulti),
		Hardlink("bin/empty-link", "bin/empty"),
		Dir("tmp/", 0o1777).At(PreEpoch),
		Reg("tmp/pre-epoch", 0o644, Text(11, 50)).At(PreEpoch),
		Reg("tmp/old", 0o644, Text(12, 60)).At(Old),
		Dir("shared/", 0o2775).Own(0, 100),
		Symlink("shared/rel", "../"+RichMulti),
		Symlink("shared/abs", "/etc/passwd").Own(1000, 1000),
		Symlink("shared/dangling", "no/such/file"),
		Symlink("shared/longtarget", strings.Repeat("t/", 100)+"end"),
		Symlink("shared/xlink", "rel").X("trusted.sym", "s"),
		Dir("dev/", 0o755),
		Char("dev/null", 0o666, 1, 3),
		Char("dev/bigminor", 0o600, 4, 300),
		Block("dev/sda1", 0o660, 8, 1).Own(0, 6),
		Block("dev/nvme", 0o660, 259, 65536),
		Fifo("dev/initctl", 0o600),
		Fifo("dev/pipe", 0o644).Own(1000, 1000),
		Hardlink("dev/null-link", "dev/null"),
		Dir("xattrs/", 0o755).X("user.dirattr", "d").X("trusted.lazypull", "t"),
		Reg("xattrs/file", 0o644, Text(13, 77)).X("user.a", "1").X("user.big", strings.Repeat("v", 3000)).
			X("trusted.t", "tv").X("user.bin", "\x00\xff\x00"),
		Dir("ids/", 0o755),
		Reg("ids/big", 0o644, Text(14, 10)).Own(200000, 300000),
		Reg("ids/nobody", 0o644, Text(15, 10)).Own(65534, 65534),
		Dir(DeepDir+"/", 0o700),
		Reg(DeepDir+"/"+LongName, 0o644, Text(16, 123)),
		Dir("names/", 0o755),
		Reg("names/with space", 0o644, []byte("space")),
		Reg("names/ünïcødé", 0o644, []byte("unicode")),
		Reg("names/tab\there", 0o644, []byte("tab")),
		Reg("names/.whatever", 0o644, []byte("not a whiteout")),
		Reg("names/.wh", 0o644, []byte("not a whiteout either")),
		Reg("names/stargz.index.json", 0o644, []byte("{}")),
		Reg("implicit/parent/file", 0o644, []byte("parents have no entries")),
		Dir("many/", 0o755),
	}
	for i := range 300 {
		e = append(e, Reg(fmt.Sprintf("many/file-%03d-%s", i, strings.Repeat("x", 40)), 0o644, Text(int64(100+i), 10+i)))
	}
	e = append(e,
		Dir("wh/", 0o755),
		Whiteout("wh", "gone").Own(1, 2).At(Old),
		Whiteout("wh", "both"),
		Reg("wh/both", 0o644, []byte("the layer's own file wins")),
		Dir(RichOpaque+"/", 0o755).X("user.mine", "m"),
		Opaque(RichOpaque),
		Reg(RichOpaque+"/keep", 0o644, []byte("kept")),
		Whiteout("", "rootgone"),
	)
	return e
}
