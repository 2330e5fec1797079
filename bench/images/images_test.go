package images

import (
	"os"
	"path/filepath"
	"testing"
)

func TestSpecHashChangesWithContent(t *testing.T) {
	s := DefaultSpecs()[0]
	h := s.hash("bookworm")
	if h != s.hash("bookworm") {
		t.Fatal("hash is not stable")
	}
	if h == s.hash("trixie") {
		t.Error("suite does not change the hash")
	}
	s2 := s
	s2.Files = map[string]string{"/bench/start.py": "print('other')"}
	if h == s2.hash("bookworm") {
		t.Error("file content does not change the hash")
	}
	s3 := s
	s3.Packages = append([]string{"curl"}, s.Packages...)
	if h == s3.hash("bookworm") {
		t.Error("packages do not change the hash")
	}
}

func TestMirrorFromSources(t *testing.T) {
	dir := t.TempDir()
	deb822 := filepath.Join(dir, "debian.sources")
	os.WriteFile(deb822, []byte("Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\nTypes: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n"), 0o644)
	list := filepath.Join(dir, "sources.list")
	os.WriteFile(list, []byte("# comment\ndeb [arch=amd64] http://old.example/debian bookworm main\n"), 0o644)
	if m, err := mirrorFrom([]string{deb822, list}); err != nil || m != "http://mirror.example/debian" {
		t.Errorf("deb822 first: %q %v", m, err)
	}
	if m, err := mirrorFrom([]string{list}); err != nil || m != "http://old.example/debian" {
		t.Errorf("sources.list: %q %v", m, err)
	}
	if _, err := mirrorFrom([]string{filepath.Join(dir, "missing")}); err == nil {
		t.Error("no sources: want an error")
	}
}

func TestDefaultSpecsAreComplete(t *testing.T) {
	seen := map[string]bool{}
	for _, s := range DefaultSpecs() {
		if s.Name == "" || seen[s.Name] || len(s.Packages) == 0 || len(s.Cmd) == 0 || s.Ready == "" {
			t.Errorf("incomplete or duplicate spec %+v", s)
		}
		seen[s.Name] = true
	}
	if len(seen) < 4 {
		t.Errorf("%d images, the benchmark needs at least 4", len(seen))
	}
}
