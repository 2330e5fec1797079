package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/remote"
)

func newConvertCommand() *cobra.Command {
	var (
		rf         registryFlags
		bf         buildFlags
		prioritize string
	)
	cmd := &cobra.Command{
		Use:   "convert [flags] SRC DST",
		Short: "Convert an image to eStargz and push it",
		Long: `Convert every layer of the image SRC to eStargz (gzip, or zstd:chunked with
--zstd) and push the result to DST. SRC and DST are registry references
(e.g. 127.0.0.1:5000/app:v1) or oci-layout:DIR[:TAG]. An index converts all
platforms unless --platform selects some. Layers already in eStargz form
are kept (rebuilt when --prioritize is given); blobs DST already has are
not uploaded again.`,
		Example: `  lazypull convert 127.0.0.1:5000/app:v1 127.0.0.1:5000/app:v1-esgz
  lazypull convert --zstd --prioritize startup.txt oci-layout:./app:v1 registry.example.com/app:esgz`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 2 {
				return usageError{fmt.Errorf("convert needs SRC and DST, got %d arguments", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := bf.options()
			if err != nil {
				return err
			}
			if prioritize != "" {
				if opts.Build.Prioritized, err = readLines(prioritize); err != nil {
					return usageError{fmt.Errorf("--prioritize: %w", err)}
				}
			}
			reg, err := rf.registry()
			if err != nil {
				return err
			}
			res, err := convertImage(cmd, reg, args[0], args[1], opts)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s %s (%d layers, %d blobs uploaded)\n", args[1], res.Desc.Digest, len(res.Layers), res.Uploaded)
			return nil
		},
	}
	rf.add(cmd)
	bf.add(cmd)
	cmd.Flags().StringVar(&prioritize, "prioritize", "", "file listing paths read at start-up, one per line, in order")
	return cmd
}

// buildFlags are the flags that choose how layers are converted (convert
// and optimize).
type buildFlags struct {
	zstd      bool
	chunkSize string
	level     int
	platform  string
	parallel  int
}

func (bf *buildFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.BoolVar(&bf.zstd, "zstd", false, "produce zstd:chunked instead of gzip eStargz")
	f.StringVar(&bf.chunkSize, "chunk-size", "auto", `split regular files into chunks of this many bytes (suffixes K and M: 1024 and 1048576); "auto" picks them by file size and type`)
	f.IntVar(&bf.level, "level", 0, fmt.Sprintf("compression level (gzip 1-9, default %d; zstd 1-22, default 3)", estargz.DefaultGzipLevel))
	f.StringVar(&bf.platform, "platform", "", "convert only these platforms of an index (comma-separated, e.g. linux/amd64)")
	f.IntVar(&bf.parallel, "parallel", 2, "layers converted at once")
}

// options checks the flags and returns the conversion options they give.
func (bf *buildFlags) options() (convert.Options, error) {
	chunkSize, err := parseChunkSize(bf.chunkSize)
	if err != nil {
		return convert.Options{}, usageError{fmt.Errorf("--chunk-size %q: %w", bf.chunkSize, err)}
	}
	comp := estargz.Gzip
	if bf.zstd {
		comp = estargz.Zstd
	}
	level := bf.level
	if level != 0 && ((comp == estargz.Gzip && (level < 1 || level > 9)) || (comp == estargz.Zstd && (level < 1 || level > 22))) {
		return convert.Options{}, usageError{fmt.Errorf("--level %d: gzip takes 1-9, zstd 1-22", level)}
	}
	match, _, err := parsePlatforms(bf.platform)
	if err != nil {
		return convert.Options{}, err
	}
	return convert.Options{
		Build:    estargz.BuildOptions{Compression: comp, Level: level, ChunkSize: chunkSize},
		Platform: match,
		Parallel: bf.parallel,
	}, nil
}

// parseChunkSize parses --chunk-size: "auto" (0) or a number of bytes
// with an optional K or M suffix, between 4 KiB and 256 MiB.
func parseChunkSize(s string) (int64, error) {
	if s == "auto" {
		return 0, nil
	}
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		s, mult = strings.TrimSuffix(s, "K"), 1<<10
	case strings.HasSuffix(s, "M"):
		s, mult = strings.TrimSuffix(s, "M"), 1<<20
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, errors.New(`want "auto" or a number of bytes`)
	}
	if n < 4096/mult || n > (256<<20)/mult {
		return 0, fmt.Errorf("must be between 4096 and %d bytes", 256<<20)
	}
	n *= mult
	if n < 4096 {
		return 0, fmt.Errorf("must be between 4096 and %d bytes", 256<<20)
	}
	return n, nil
}

// convertImage converts src to dst (references or oci-layout:) with opts,
// showing progress bars on a terminal.
func convertImage(cmd *cobra.Command, reg *remote.Registry, src, dst string, opts convert.Options) (*convert.Result, error) {
	s, err := convert.OpenStore(src, reg)
	if err != nil {
		return nil, usageError{err}
	}
	d, err := convert.OpenStore(dst, reg)
	if err != nil {
		return nil, usageError{err}
	}
	pg := newProgress(cmd.ErrOrStderr())
	opts.Progress = func(e convert.Event) {
		name := e.Layer.Encoded()[:12]
		switch e.Phase {
		case convert.PhaseDone, convert.PhaseKept:
			pg.finish(name, string(e.Phase))
		default:
			pg.update(name, string(e.Phase), e.Done, e.Total)
		}
	}
	res, err := convert.Convert(cmd.Context(), s, d, opts)
	pg.wait()
	return res, err
}

// readLines reads non-empty, non-comment lines.
func readLines(name string) ([]string, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		out = append(out, line)
	}
	return out, sc.Err()
}
