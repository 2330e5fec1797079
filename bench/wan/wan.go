// Package wan emulates a wide-area network link in user space: a TCP proxy
// that adds round-trip time and caps bandwidth, for benchmarks on machines
// whose kernel has no netem.
//
// Every byte crossing the proxy is delayed by half the round-trip time in
// each direction and then paced by a token bucket per direction that all
// connections share, as they would share a real link. A new connection
// waits one round trip before its first byte is forwarded, standing in for
// the TCP handshake. The queue between the delay and the pacer is bounded
// by the bandwidth-delay product, so a sender that outruns the link is
// pushed back through TCP flow control instead of filling memory.
package wan

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Profile describes a link.
type Profile struct {
	// Name labels the profile in reports, e.g. "40ms-100Mbit".
	Name string
	// RTT is the round-trip time the proxy adds.
	RTT time.Duration
	// BitsPerSecond caps throughput in each direction; 0 is unlimited.
	BitsPerSecond int64
}

// String returns the profile's name, or a description.
func (p Profile) String() string {
	if p.Name != "" {
		return p.Name
	}
	return fmt.Sprintf("%s/%dMbit", p.RTT, p.BitsPerSecond/1_000_000)
}

// BytesPerSecond returns the bandwidth in bytes per second (0 = unlimited).
func (p Profile) BytesPerSecond() float64 { return float64(p.BitsPerSecond) / 8 }

// Proxy forwards TCP connections to an upstream address through an
// emulated link.
type Proxy struct {
	ln       net.Listener
	upstream string
	p        Profile
	up, down *rate.Limiter

	sent, received atomic.Int64 // client->server, server->client bytes
	conns          sync.WaitGroup
	mu             sync.Mutex
	open           map[net.Conn]struct{}
	closed         bool
}

const chunkSize = 16 << 10

// Listen starts a proxy on addr (e.g. "127.0.0.1:0") forwarding to
// upstream through a link with profile p.
func Listen(addr, upstream string, p Profile) (*Proxy, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("wan: listening on %s: %w", addr, err)
	}
	px := &Proxy{ln: ln, upstream: upstream, p: p, open: map[net.Conn]struct{}{}}
	if p.BitsPerSecond > 0 {
		bps := p.BytesPerSecond()
		burst := max(chunkSize, int(bps/100)) // 10 ms worth
		px.up = rate.NewLimiter(rate.Limit(bps), burst)
		px.down = rate.NewLimiter(rate.Limit(bps), burst)
	}
	go px.serve()
	return px, nil
}

// Addr returns the proxy's listening address.
func (px *Proxy) Addr() string { return px.ln.Addr().String() }

// Profile returns the emulated link's profile.
func (px *Proxy) Profile() Profile { return px.p }

// Bytes returns the bytes forwarded so far from clients to the upstream
// and from the upstream to clients.
func (px *Proxy) Bytes() (sent, received int64) { return px.sent.Load(), px.received.Load() }

// ResetCounters zeroes the byte counters.
func (px *Proxy) ResetCounters() {
	px.sent.Store(0)
	px.received.Store(0)
}

// Close stops accepting, closes every connection and waits for them.
func (px *Proxy) Close() error {
	px.mu.Lock()
	px.closed = true
	for c := range px.open {
		c.Close()
	}
	px.mu.Unlock()
	err := px.ln.Close()
	px.conns.Wait()
	return err
}

func (px *Proxy) track(c net.Conn) bool {
	px.mu.Lock()
	defer px.mu.Unlock()
	if px.closed {
		c.Close()
		return false
	}
	px.open[c] = struct{}{}
	return true
}

func (px *Proxy) untrack(c net.Conn) {
	px.mu.Lock()
	delete(px.open, c)
	px.mu.Unlock()
	c.Close()
}

func (px *Proxy) serve() {
	for {
		c, err := px.ln.Accept()
		if err != nil {
			return
		}
		if !px.track(c) {
			continue
		}
		px.conns.Add(1)
		go func() {
			defer px.conns.Done()
			px.handle(c)
		}()
	}
}

func (px *Proxy) handle(client net.Conn) {
	defer px.untrack(client)
	server, err := net.Dial("tcp", px.upstream)
	if err != nil {
		return
	}
	if !px.track(server) {
		return
	}
	defer px.untrack(server)
	// The handshake costs a round trip on a real link.
	time.Sleep(px.p.RTT)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		px.pipe(ctx, server, client, px.up, &px.sent)
		closeWrite(server)
	}()
	go func() {
		defer wg.Done()
		px.pipe(ctx, client, server, px.down, &px.received)
		closeWrite(client)
	}()
	wg.Wait()
}

func closeWrite(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
}

type packet struct {
	data []byte
	at   time.Time // when it may leave
}

// pipe copies src to dst through the emulated link in one direction.
func (px *Proxy) pipe(ctx context.Context, dst io.Writer, src io.Reader, lim *rate.Limiter, count *atomic.Int64) {
	oneWay := px.p.RTT / 2
	// Bound the queue by the bandwidth-delay product (at least 8 packets).
	depth := 8
	if bps := px.p.BytesPerSecond(); bps > 0 {
		depth = max(depth, int(bps*px.p.RTT.Seconds())/chunkSize+1)
	} else {
		depth = 256
	}
	q := make(chan packet, depth)
	go func() {
		defer close(q)
		for {
			buf := make([]byte, chunkSize)
			n, err := src.Read(buf)
			if n > 0 {
				select {
				case q <- packet{data: buf[:n], at: time.Now().Add(oneWay)}:
				case <-ctx.Done():
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	for pk := range q {
		if d := time.Until(pk.at); d > 0 {
			time.Sleep(d)
		}
		if lim != nil {
			for rest := len(pk.data); rest > 0; {
				n := min(rest, lim.Burst())
				if err := lim.WaitN(ctx, n); err != nil {
					return
				}
				rest -= n
			}
		}
		if _, err := dst.Write(pk.data); err != nil {
			return // the other side is gone; handle closes both ends
		}
		count.Add(int64(len(pk.data)))
	}
}
