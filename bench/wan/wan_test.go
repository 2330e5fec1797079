package wan

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"testing"
	"time"
)

// echoServer serves size random bytes to every connection.
func dataServer(t *testing.T, data []byte) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var b [1]byte
				if _, err := c.Read(b[:]); err != nil {
					return
				}
				c.Write(data)
			}()
		}
	}()
	return ln.Addr().String()
}

func fetch(t *testing.T, addr string) ([]byte, time.Duration) {
	t.Helper()
	start := time.Now()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte{1}); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	return got, time.Since(start)
}

func TestProxyDeliversBytesIntact(t *testing.T) {
	data := make([]byte, 3<<20)
	rand.Read(data)
	px, err := Listen("127.0.0.1:0", dataServer(t, data), Profile{RTT: 2 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer px.Close()
	got, _ := fetch(t, px.Addr())
	if !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes, want the %d sent, unchanged", len(got), len(data))
	}
	if sent, recv := px.Bytes(); sent != 1 || recv != int64(len(data)) {
		t.Fatalf("counters: sent %d received %d, want 1 and %d", sent, recv, len(data))
	}
}

// The link's delay and pacing must show: a transfer cannot beat
// handshake + round trip + size/bandwidth. (A lower bound only: the machine
// may be slow, never faster than the emulated link.)
func TestProxyAddsLatencyAndCapsBandwidth(t *testing.T) {
	data := make([]byte, 1<<20)
	p := Profile{RTT: 50 * time.Millisecond, BitsPerSecond: 40_000_000} // 5 MB/s
	px, err := Listen("127.0.0.1:0", dataServer(t, data), p)
	if err != nil {
		t.Fatal(err)
	}
	defer px.Close()
	_, took := fetch(t, px.Addr())
	floor := 2*p.RTT + time.Duration(float64(len(data))/p.BytesPerSecond()*float64(time.Second)) - 30*time.Millisecond // minus the token bucket's initial burst
	if took < floor {
		t.Fatalf("1 MiB over %v took %v, faster than the link allows (%v)", p, took, floor)
	}
}

func TestCloseEndsConnections(t *testing.T) {
	data := make([]byte, 8<<20)
	px, err := Listen("127.0.0.1:0", dataServer(t, data), Profile{RTT: time.Millisecond, BitsPerSecond: 8_000_000})
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", px.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte{1})
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, c); close(done) }()
	time.Sleep(50 * time.Millisecond)
	px.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a connection outlived Close")
	}
}
