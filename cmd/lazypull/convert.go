package main

import (
	"bufio"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/lazypull/lazypull/convert"
	"github.com/lazypull/lazypull/estargz"
)

func newConvertCommand() *cobra.Command {
	var (
		rf         registryFlags
		zstd       bool
		chunkSize  int64
		level      int
		prioritize string
		platform   string
		parallel   int
	)
	cmd := &cobra.Command{
		Use:   "convert [flags] SRC DST",
		Short: "Convert an image to eStargz and push it",
		Long: `Convert every layer of the image SRC to eStargz (gzip, or zstd:chunked with
--zstd) and push the result to DST. SRC and DST are registry references
(e.g. 127.0.0.1:5000/app:v1) or oci-layout:DIR[:TAG]. An index converts all
platforms unless --platform selects some. Layers already in eStargz form
are kept; blobs DST already has are not uploaded again.`,
		Example: `  lazypull convert 127.0.0.1:5000/app:v1 127.0.0.1:5000/app:v1-esgz
  lazypull convert --zstd --prioritize startup.txt oci-layout:./app:v1 registry.example.com/app:esgz`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 2 {
				return usageError{fmt.Errorf("convert needs SRC and DST, got %d arguments", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if chunkSize < 4096 || chunkSize > 256<<20 {
				return usageError{fmt.Errorf("--chunk-size %d: must be between 4096 and %d bytes", chunkSize, 256<<20)}
			}
			comp := estargz.Gzip
			if zstd {
				comp = estargz.Zstd
			}
			if level != 0 && ((comp == estargz.Gzip && (level < 1 || level > 9)) || (comp == estargz.Zstd && (level < 1 || level > 22))) {
				return usageError{fmt.Errorf("--level %d: gzip takes 1-9, zstd 1-22", level)}
			}
			match, _, err := parsePlatforms(platform)
			if err != nil {
				return err
			}
			var prio []string
			if prioritize != "" {
				if prio, err = readLines(prioritize); err != nil {
					return usageError{fmt.Errorf("--prioritize: %w", err)}
				}
			}
			reg, err := rf.registry()
			if err != nil {
				return err
			}
			src, err := convert.OpenStore(args[0], reg)
			if err != nil {
				return usageError{err}
			}
			dst, err := convert.OpenStore(args[1], reg)
			if err != nil {
				return usageError{err}
			}
			pg := newProgress(cmd.ErrOrStderr())
			res, err := convert.Convert(cmd.Context(), src, dst, convert.Options{
				Build: estargz.BuildOptions{
					Compression: comp, Level: level, ChunkSize: chunkSize, Prioritized: prio,
				},
				Platform: match,
				Parallel: parallel,
				Progress: func(e convert.Event) {
					name := e.Layer.Encoded()[:12]
					switch e.Phase {
					case convert.PhaseDone, convert.PhaseKept:
						pg.finish(name, string(e.Phase))
					default:
						pg.update(name, string(e.Phase), e.Done, e.Total)
					}
				},
			})
			pg.wait()
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s %s (%d layers, %d blobs uploaded)\n", args[1], res.Desc.Digest, len(res.Layers), res.Uploaded)
			return nil
		},
	}
	rf.add(cmd)
	f := cmd.Flags()
	f.BoolVar(&zstd, "zstd", false, "produce zstd:chunked instead of gzip eStargz")
	f.Int64Var(&chunkSize, "chunk-size", estargz.DefaultChunkSize, "split regular files into chunks of this many bytes")
	f.IntVar(&level, "level", 0, fmt.Sprintf("compression level (gzip 1-9, default %d; zstd 1-22, default 3)", estargz.DefaultGzipLevel))
	f.StringVar(&prioritize, "prioritize", "", "file listing paths read at start-up, one per line, in order")
	f.StringVar(&platform, "platform", "", "convert only these platforms of an index (comma-separated, e.g. linux/amd64)")
	f.IntVar(&parallel, "parallel", 2, "layers converted at once")
	return cmd
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
