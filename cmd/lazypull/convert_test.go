package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/lazypull/lazypull/estargz"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// getManifest reads a manifest or index from the registry.
func getManifest(t *testing.T, reg *remotetest.Registry, repo, ref string) []byte {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, reg.URL()+"/v2/"+repo+"/manifests/"+ref, nil)
	req.Header.Set("Accept", ocispec.MediaTypeImageIndex+", "+ocispec.MediaTypeImageManifest)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s:%s: %d %s", repo, ref, resp.StatusCode, b)
	}
	return b
}

func parseManifest(t *testing.T, raw []byte) ocispec.Manifest {
	t.Helper()
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// checkLayers opens every layer of m with estargz and verifies it; it
// returns the plain tar entry names of each layer in order.
func checkLayers(t *testing.T, m ocispec.Manifest, blob func(digest.Digest) []byte, mediaType string) [][]string {
	t.Helper()
	var names [][]string
	for _, l := range m.Layers {
		if l.MediaType != mediaType {
			t.Errorf("layer %s: media type %s, want %s", l.Digest, l.MediaType, mediaType)
		}
		b := blob(l.Digest)
		r, err := estargz.Open(bytes.NewReader(b), int64(len(b)), estargz.OpenOptions{TOCDigest: digest.Digest(l.Annotations[estargz.TOCDigestAnnotation])})
		if err != nil {
			t.Fatalf("layer %s: %v", l.Digest, err)
		}
		if err := r.Verify(); err != nil {
			t.Errorf("layer %s: %v", l.Digest, err)
		}
		if l.Annotations[estargz.UncompressedSizeAnnotation] == "" {
			t.Errorf("layer %s: no %s", l.Digest, estargz.UncompressedSizeAnnotation)
		}
		var plain io.Reader
		if r.Footer.Compression == estargz.Zstd {
			zr, err := zstd.NewReader(bytes.NewReader(b))
			if err != nil {
				t.Fatal(err)
			}
			defer zr.Close()
			plain = zr
		} else {
			zr, err := gzip.NewReader(bytes.NewReader(b))
			if err != nil {
				t.Fatal(err)
			}
			plain = zr
		}
		var ns []string
		tr := tar.NewReader(plain)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("layer %s: %v", l.Digest, err)
			}
			ns = append(ns, strings.TrimSuffix(h.Name, "/"))
		}
		names = append(names, ns)
	}
	return names
}

var successLine = regexp.MustCompile(`^(\S+) (sha256:[0-9a-f]{64}) \((\d+) layers, (\d+) blobs uploaded\)\n$`)

func TestConvertCommand(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	reg.PushImage(t, "app", "v1", testLayers(t)...)
	dst := reg.Ref("app", "esgz")
	out, errOut, err := run(t, append(hermetic(t), "convert", reg.Ref("app", "v1"), dst)...)
	if err != nil {
		t.Fatal(err)
	}
	if errOut != "" {
		t.Errorf("stderr without a terminal: %q", errOut)
	}
	sm := successLine.FindStringSubmatch(out)
	if sm == nil || sm[1] != dst || sm[3] != "2" || sm[4] != "3" {
		t.Fatalf("output %q, want %q <digest> (2 layers, 3 blobs uploaded)", out, dst)
	}
	raw := getManifest(t, reg, "app", "esgz")
	if digest.FromBytes(raw).String() != sm[2] {
		t.Errorf("printed digest %s, registry has %s", sm[2], digest.FromBytes(raw))
	}
	checkLayers(t, parseManifest(t, raw), func(d digest.Digest) []byte { return reg.Blob(t, "app", d) }, ocispec.MediaTypeImageLayerGzip)

	// Again: nothing to upload.
	out, _, err = run(t, append(hermetic(t), "convert", reg.Ref("app", "v1"), dst)...)
	if sm := successLine.FindStringSubmatch(out); err != nil || sm == nil || sm[4] != "0" {
		t.Errorf("second conversion: %q, %v; want 0 blobs uploaded", out, err)
	}
}

// TestConvertCommandFlags converts an index with --zstd, --chunk-size,
// --level, --prioritize and --platform.
func TestConvertCommandFlags(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	layers := testLayers(t)
	amd := reg.PushPlatformImage(t, "multi", "", ocispec.Platform{OS: "linux", Architecture: "amd64"}, layers...)
	arm := reg.PushPlatformImage(t, "multi", "", ocispec.Platform{OS: "linux", Architecture: "arm64"}, layers[0])
	reg.PushIndex(t, "multi", "v1", amd.ManifestDesc, arm.ManifestDesc)
	prio := filepath.Join(t.TempDir(), "prio.txt")
	os.WriteFile(prio, []byte("# start-up files\n\nusr/share/doc/readme\n  etc/os-release  \n"), 0o644)

	out, errOut, err := run(t, append(hermetic(t), "convert", "--zstd", "--chunk-size", "65536", "--level", "5", "--prioritize", prio,
		"--platform", "linux/arm64", "--plain-http", reg.Ref("multi", "v1"), reg.Ref("multi", "esgz"))...)
	if err != nil || errOut != "" || !successLine.MatchString(out) {
		t.Fatalf("convert: %v, stdout %q, stderr %q", err, out, errOut)
	}
	var idx ocispec.Index
	json.Unmarshal(getManifest(t, reg, "multi", "esgz"), &idx)
	if len(idx.Manifests) != 1 || idx.Manifests[0].Platform == nil || idx.Manifests[0].Platform.Architecture != "arm64" {
		t.Fatalf("index %+v, want only linux/arm64", idx.Manifests)
	}
	m := parseManifest(t, getManifest(t, reg, "multi", idx.Manifests[0].Digest.String()))
	names := checkLayers(t, m, func(d digest.Digest) []byte { return reg.Blob(t, "multi", d) }, ocispec.MediaTypeImageLayerZstd)
	if m.Layers[0].Annotations[estargz.ZstdChunkedManifestPositionAnnotation] == "" {
		t.Errorf("no zstd:chunked annotations: %v", m.Layers[0].Annotations)
	}
	lm := slices.Index(names[0], estargz.PrefetchLandmark)
	readme, osr, tool := slices.Index(names[0], "usr/share/doc/readme"), slices.Index(names[0], "etc/os-release"), slices.Index(names[0], "usr/bin/tool")
	if lm < 0 || readme < 0 || readme > osr || osr > lm || tool < lm {
		t.Errorf("entries %v: want readme, os-release, landmark, ..., tool", names[0])
	}
	// --chunk-size: the 900 KB file is in 64 KiB chunks.
	b := reg.Blob(t, "multi", m.Layers[0].Digest)
	r, err := estargz.Open(bytes.NewReader(b), int64(len(b)), estargz.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n, ok := r.Lookup("usr/bin/tool"); !ok || len(n.Chunks) != int((n.Size+65535)/65536) {
		t.Errorf("usr/bin/tool: %v chunks, want %d", len(n.Chunks), (n.Size+65535)/65536)
	}
}

func TestConvertCommandLayout(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	reg.PushImage(t, "app", "v1", testLayers(t)...)
	dir := t.TempDir()
	// registry -> layout -> layout -> registry
	for _, step := range [][2]string{
		{reg.Ref("app", "v1"), "oci-layout:" + dir + "/a:v1"},
		{"oci-layout:" + dir + "/a:v1", "oci-layout:" + dir + "/b"},
		{"oci-layout:" + dir + "/b", reg.Ref("app", "from-layout")},
	} {
		out, errOut, err := run(t, append(hermetic(t), "convert", step[0], step[1])...)
		if err != nil || errOut != "" || !successLine.MatchString(out) || !strings.HasPrefix(out, step[1]+" ") {
			t.Fatalf("convert %s %s: %v, stdout %q, stderr %q", step[0], step[1], err, out, errOut)
		}
	}
	m := parseManifest(t, getManifest(t, reg, "app", "from-layout"))
	checkLayers(t, m, func(d digest.Digest) []byte { return reg.Blob(t, "app", d) }, ocispec.MediaTypeImageLayerGzip)
	var idx ocispec.Index
	b, _ := os.ReadFile(filepath.Join(dir, "b", "index.json"))
	if err := json.Unmarshal(b, &idx); err != nil || len(idx.Manifests) != 1 {
		t.Fatalf("b/index.json: %s (%v)", b, err)
	}
	if idx.Manifests[0].Digest != digest.FromBytes(getManifest(t, reg, "app", "from-layout")) {
		t.Error("layout and registry hold different manifests")
	}
	// A missing tag names it.
	_, _, err := run(t, "convert", "oci-layout:"+dir+"/a:nope", "oci-layout:"+dir+"/c")
	if err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("missing tag: %v", err)
	}
}

func TestConvertCommandPrioritizeMissing(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	reg.PushImage(t, "app", "v1", testLayers(t)...)
	missing := filepath.Join(t.TempDir(), "startup.txt")
	reg.ResetRequests()
	out, _, err := run(t, append(hermetic(t), "convert", "--prioritize", missing, reg.Ref("app", "v1"), reg.Ref("app", "esgz"))...)
	if err == nil || !strings.Contains(err.Error(), "--prioritize") || !strings.Contains(err.Error(), missing) || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("error %v, want one naming --prioritize and the file", err)
	}
	if out != "" || len(reg.Requests()) != 0 {
		t.Errorf("stdout %q, %d registry requests: work started before the flags were checked", out, len(reg.Requests()))
	}
}

// TestConvertCommandCredentials converts between repositories of a
// registry that requires a login, with credentials from the docker
// config.json.
func TestConvertCommandCredentials(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithBasicAuth("alice", "s3cret"))
	reg.PushImage(t, "app", "v1", testLayers(t)...)
	args := append(hermetic(t), "convert", reg.Ref("app", "v1"), reg.Ref("app", "esgz"))

	cfgDir := t.TempDir()
	t.Setenv("DOCKER_CONFIG", cfgDir)
	if _, _, err := run(t, args...); err == nil {
		t.Fatal("converted without credentials")
	}
	auth := base64.StdEncoding.EncodeToString([]byte("alice:s3cret"))
	os.WriteFile(filepath.Join(cfgDir, "config.json"), []byte(`{"auths":{"`+reg.Host()+`":{"auth":"`+auth+`"}}}`), 0o600)
	out, _, err := run(t, args...)
	if err != nil || !successLine.MatchString(out) {
		t.Fatalf("with docker credentials: %v, %q", err, out)
	}
}

// TestConvertProcess runs the process with stdout and stderr as pipes: no
// progress display, nothing on stderr.
func TestConvertProcess(t *testing.T) {
	reg := remotetest.NewRegistry(t)
	reg.PushImage(t, "app", "v1", testLayers(t)...)
	out, errOut, code := runProcess(t, []string{"DOCKER_CONFIG=" + t.TempDir()}, append(hermetic(t), "convert", reg.Ref("app", "v1"), reg.Ref("app", "esgz"))...)
	if code != 0 || errOut != "" || !successLine.MatchString(out) {
		t.Errorf("exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

// openPTY returns a pseudo-terminal's master and slave.
func openPTY(t *testing.T) (*os.File, *os.File) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	fd := int(master.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		master.Close()
		t.Skipf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		master.Close()
		t.Skipf("ptsname: %v", err)
	}
	slave, err := os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		master.Close()
		t.Skipf("opening the pty: %v", err)
	}
	// A wide terminal, so that bars are not cut.
	unix.IoctlSetWinsize(int(slave.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 40, Col: 160})
	return master, slave
}

// TestConvertProgressOnTerminal: with stderr on a terminal, each layer
// gets a progress line.
func TestConvertProgressOnTerminal(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("linux pty")
	}
	reg := remotetest.NewRegistry(t)
	img := reg.PushImage(t, "app", "v1", testLayers(t)...)
	master, slave := openPTY(t)
	defer master.Close()
	got := make(chan string)
	go func() {
		var buf bytes.Buffer
		io.Copy(&buf, master) // ends with EIO once the slave is closed
		got <- buf.String()
	}()

	var out bytes.Buffer
	cmd := newRootCommand()
	cmd.SetArgs(append(hermetic(t), "convert", img.Ref, reg.Ref("app", "esgz")))
	cmd.SetOut(&out)
	cmd.SetErr(slave)
	err := cmd.Execute()
	slave.Close()
	var display string
	select {
	case display = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("terminal output did not end")
	}
	if err != nil || !successLine.MatchString(out.String()) {
		t.Fatalf("convert: %v, %q", err, out.String())
	}
	for _, l := range img.Layers {
		if !strings.Contains(display, l.Digest.Encoded()[:12]) {
			t.Errorf("terminal output has no line for layer %s:\n%q", l.Digest.Encoded()[:12], display)
		}
	}
	t.Logf("terminal: %q", display)
	if !strings.Contains(display, "done") {
		t.Errorf("terminal output does not show layers done:\n%q", display)
	}
}
