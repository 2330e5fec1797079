// Member compressors: each segment becomes one complete gzip member or
// zstd frame, compressed by a fresh (reset) compressor so that the same
// input always gives the same bytes.

package estargz

import (
	"bytes"
	"fmt"
	"io"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// memberCompressor compresses one segment into one member or frame.
type memberCompressor interface {
	compress(dst, src []byte) ([]byte, error)
}

func newCompressorFactory(c Compression, level int) (func() (memberCompressor, error), error) {
	switch c {
	case Gzip:
		if level == 0 {
			level = DefaultGzipLevel
		}
		if level < gzip.BestSpeed || level > gzip.BestCompression {
			return nil, fmt.Errorf("estargz: gzip level %d out of range 1-9", level)
		}
		return func() (memberCompressor, error) {
			zw, err := gzip.NewWriterLevel(io.Discard, level)
			if err != nil {
				return nil, fmt.Errorf("estargz: gzip writer: %w", err)
			}
			return &gzipMember{zw: zw}, nil
		}, nil
	case Zstd:
		if level == 0 {
			level = 3
		}
		if level < 1 || level > 22 {
			return nil, fmt.Errorf("estargz: zstd level %d out of range 1-22", level)
		}
		return func() (memberCompressor, error) {
			enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(level)),
				zstd.WithEncoderConcurrency(1), zstd.WithZeroFrames(true))
			if err != nil {
				return nil, fmt.Errorf("estargz: zstd writer: %w", err)
			}
			return &zstdMember{enc: enc}, nil
		}, nil
	}
	return nil, fmt.Errorf("estargz: unknown compression %v", c)
}

type gzipMember struct {
	zw  *gzip.Writer
	buf bytes.Buffer
}

func (g *gzipMember) compress(dst, src []byte) ([]byte, error) {
	g.buf.Reset()
	g.zw.Reset(&g.buf)
	if _, err := g.zw.Write(src); err != nil {
		return nil, err
	}
	if err := g.zw.Close(); err != nil {
		return nil, err
	}
	return append(dst, g.buf.Bytes()...), nil
}

type zstdMember struct{ enc *zstd.Encoder }

func (z *zstdMember) compress(dst, src []byte) ([]byte, error) {
	return z.enc.EncodeAll(src, dst), nil
}
