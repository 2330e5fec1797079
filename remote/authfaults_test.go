package remote_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lazypull/lazypull/remote"
	"github.com/lazypull/lazypull/remote/remotetest"
)

// A token server that fails once (503) does not leave the repository
// unreadable until a restart: the authorizer's failed state is not kept,
// and the next attempt fetches a token afresh and succeeds. (Before,
// containerd's authorizer kept the failed fetch: every later read failed.)
func TestTokenServer503OnceThenReadsSucceed(t *testing.T) {
	for _, anonymous := range []bool{true, false} {
		name := "credentials"
		if anonymous {
			name = "anonymous"
		}
		t.Run(name, func(t *testing.T) {
			reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("bob", "pw", anonymous, 0))
			data := randomBytes(100_000, 12)
			img := reg.PushImage(t, "team/app", "v1", remotetest.Layer{Data: data})
			opts := remote.Options{}
			if !anonymous {
				opts.Credentials = func(string) (string, string, error) { return "bob", "pw", nil }
			}
			r := newClient(t, opts)
			ctx := context.Background()
			isToken := func(q remotetest.Request) bool { return q.Path == "/token" }
			reg.Inject(remotetest.Fault{Match: isToken, Times: 1, Status: 503})

			// The attempt that meets the 503 fails; the request's retry
			// starts over with a fresh authorizer and gets a token.
			b, err := r.OpenBlob(ctx, img.Ref, img.Layers[0])
			if err != nil {
				t.Fatalf("open after one token server failure: %v", err)
			}
			for i := range 3 {
				p := make([]byte, 100)
				if _, err := b.ReadAt(ctx, p, int64(i*1000)); err != nil || !bytes.Equal(p, data[i*1000:i*1000+100]) {
					t.Fatalf("read %d after the token server recovered: %v", i, err)
				}
			}
			if n := reg.Count(isToken); n < 2 {
				t.Errorf("%d token requests: want the failed one and a fresh one", n)
			}
		})
	}
}

// A credential helper that hangs: every read waiting for it fails when
// its own context ends, the helper is run once for the burst (not once per
// request), it is killed with what it started at the helper timeout, and
// the goroutines come back to where they were.
func TestHangingCredentialHelper(t *testing.T) {
	reg := remotetest.NewRegistry(t, remotetest.WithTokenAuth("bob", "pw", false, 0))
	img := reg.PushImage(t, "team/app", "v1", remotetest.Layer{Data: []byte("layer")})
	dir := t.TempDir()
	started := filepath.Join(dir, "started")
	script := "#!/bin/sh\necho $$ >> '" + started + "'\nsleep 987\n"
	if err := os.WriteFile(filepath.Join(dir, "docker-credential-hang"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+string(os.PathListSeparator)+os.Getenv("PATH"))
	const helperTimeout = 2 * time.Second
	r := newClient(t, remote.Options{
		DockerConfig:            writeDockerConfig(t, map[string]any{"credsStore": "hang"}),
		CredentialHelperTimeout: helperTimeout,
	})

	base := credentialGoroutines()
	const readers, fetchTimeout = 20, time.Second
	var wg sync.WaitGroup
	errs := make([]error, readers)
	for i := range readers {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
			defer cancel()
			_, errs[i] = r.Resolve(ctx, img.Ref, nil)
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(fetchTimeout + helperTimeout/2): // a liveness bound: before the helper is killed
		t.Fatal("reads waiting for a hanging credential helper did not end with their context")
	}
	for i, err := range errs {
		if err == nil {
			t.Fatalf("read %d succeeded without credentials", i)
		}
	}
	t.Log(errs[0])
	mustContain(t, errs[0], "credentials", "deadline exceeded")

	b, _ := os.ReadFile(started)
	pids := strings.Fields(string(b))
	if len(pids) != 1 {
		t.Fatalf("helper ran %d times for one burst of reads, want 1", len(pids))
	}
	// Once the helper timeout has passed, nothing is left running: not
	// the helper's process group (it runs in its own), nor goroutines.
	deadline := time.Now().Add(helperTimeout + 5*time.Second)
	for {
		n := credentialGoroutines()
		left := inProcessGroup(pids[0])
		if n <= base && left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines in the client or running helpers (were %d); %d processes left in the helper's group", n, base, left)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// inProcessGroup counts the processes in process group pgid.
func inProcessGroup(pgid string) int {
	n := 0
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...: comm may hold spaces.
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 2 && f[2] == pgid {
			n++
		}
	}
	return n
}

// credentialGoroutines counts the goroutines in the remote package's code,
// running commands or waiting on a shared call: those a hanging helper
// would pile up (idle HTTP connections are not counted).
func credentialGoroutines() int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "lazypull/remote.") || strings.Contains(g, "os/exec.") || strings.Contains(g, "singleflight.") {
			n++
		}
	}
	return n
}
