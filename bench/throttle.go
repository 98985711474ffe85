package main

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// throttle is a TCP proxy that makes a loopback registry look like one on the internet:
// every connection gets an added round-trip time and a bandwidth cap of its own, in each
// direction, the way a registry's CDN serves one TCP stream. Optionally all connections
// also share one cap from upstream to the clients: the uplink of a cluster that reaches
// the internet through one link. It counts the bytes that pass from upstream to the
// cache, which is how the scenarios tell how often a blob was fetched.
type throttle struct {
	ln     net.Listener
	target string
	rtt    time.Duration // added round-trip time; half of it is added in each direction
	rate   float64       // bytes per second per connection and direction; <= 0 is unlimited
	uplink *sharedPacer  // the cap shared by every connection, upstream to client; nil: none

	shaping atomic.Bool  // off: bytes pass at loopback speed (seeding caches for hot scenarios)
	down    atomic.Int64 // bytes upstream → client
	up      atomic.Int64 // bytes client → upstream
	conns   atomic.Int64 // connections accepted

	wg     sync.WaitGroup
	mu     sync.Mutex
	open   map[net.Conn]struct{}
	closed bool
}

// newThrottle forwards to target with rtt and rate per connection and, when total > 0,
// at most total bytes per second from upstream summed over all connections.
func newThrottle(target string, rtt time.Duration, rate, total float64) (*throttle, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	t := &throttle{ln: ln, target: target, rtt: rtt, rate: rate, open: map[net.Conn]struct{}{}}
	if total > 0 {
		t.uplink = &sharedPacer{p: newPacer(total, 64<<10)}
	}
	t.shaping.Store(true)
	t.wg.Add(1)
	go t.serve()
	return t, nil
}

func (t *throttle) Addr() string { return t.ln.Addr().String() }

// active is how many client connections are open now.
func (t *throttle) active() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.open) / 2 // each has its client and its server side, once dialled
}

// Close stops accepting, cuts every open connection and waits for the copiers.
func (t *throttle) Close() {
	t.ln.Close()
	t.mu.Lock()
	t.closed = true
	for c := range t.open {
		c.Close()
	}
	t.mu.Unlock()
	t.wg.Wait()
}

func (t *throttle) track(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		c.Close()
		return false
	}
	t.open[c] = struct{}{}
	return true
}

func (t *throttle) untrack(c net.Conn) {
	t.mu.Lock()
	delete(t.open, c)
	t.mu.Unlock()
	c.Close()
}

func (t *throttle) serve() {
	defer t.wg.Done()
	for {
		c, err := t.ln.Accept()
		if err != nil {
			return
		}
		t.conns.Add(1)
		if !t.track(c) {
			return
		}
		t.wg.Add(1)
		go t.handle(c)
	}
}

func (t *throttle) handle(client net.Conn) {
	defer t.wg.Done()
	defer t.untrack(client)
	if t.shaping.Load() && t.rtt > 0 {
		// The TCP handshake with a distant server costs one round trip before any byte moves.
		time.Sleep(t.rtt)
	}
	server, err := net.Dial("tcp", t.target)
	if err != nil {
		return
	}
	if !t.track(server) {
		return
	}
	defer t.untrack(server)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); t.pipe(server, client, &t.up, nil) }()
	go func() { defer wg.Done(); t.pipe(client, server, &t.down, t.uplink) }()
	wg.Wait()
}

type chunk struct {
	b  []byte
	at time.Time // when the bytes arrived at the proxy
}

var chunkPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// pipe copies src to dst, delaying each chunk by half the round-trip time and pacing the
// stream to the rate (and to the shared cap, if any), while the reader keeps reading so
// delay does not cut throughput.
func (t *throttle) pipe(dst, src net.Conn, count *atomic.Int64, shared *sharedPacer) {
	chunks := make(chan chunk, 256) // bounds what one direction buffers: 8 MiB
	go func() {
		defer close(chunks)
		for {
			bp := chunkPool.Get().(*[]byte)
			n, err := src.Read(*bp)
			if n > 0 {
				chunks <- chunk{b: (*bp)[:n], at: time.Now()}
			} else {
				chunkPool.Put(bp)
			}
			if err != nil {
				return
			}
		}
	}()
	p := newPacer(t.rate, 64<<10)
	failed := false
	for c := range chunks {
		if !failed {
			if t.shaping.Load() {
				if wait := time.Until(c.at.Add(t.rtt / 2)); wait > 0 {
					time.Sleep(wait)
				}
				now := time.Now()
				wait := p.reserve(now, len(c.b))
				if shared != nil {
					wait = max(wait, shared.reserve(now, len(c.b)))
				}
				if wait > 0 {
					time.Sleep(wait)
				}
			}
			n, err := dst.Write(c.b)
			count.Add(int64(n))
			if err != nil {
				failed = true
				src.Close() // unblock the reader; the rest is drained and dropped
			}
		}
		b := c.b[:cap(c.b)]
		chunkPool.Put(&b)
	}
	// Pass the end of stream on, so a half-closed request still gets its response.
	if tc, ok := dst.(*net.TCPConn); ok && !failed {
		if err := tc.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
			dst.Close()
		}
	} else {
		dst.Close()
	}
}

// pacer is a token bucket: a stream may send rate bytes per second on average, and burst
// bytes at once after being idle.
type pacer struct {
	rate   float64
	burst  float64
	tokens float64
	last   time.Time
}

func newPacer(rate float64, burst int) *pacer {
	return &pacer{rate: rate, burst: float64(burst), tokens: float64(burst)}
}

// reserve takes n bytes from the bucket at time now and says how long to wait before
// sending them. Waiting repays the debt, so callers must honour the delay.
func (p *pacer) reserve(now time.Time, n int) time.Duration {
	if p.rate <= 0 {
		return 0
	}
	if now.Before(p.last) {
		now = p.last // a shared pacer's callers read the clock before they queue for it
	}
	if !p.last.IsZero() {
		p.tokens += now.Sub(p.last).Seconds() * p.rate
		if p.tokens > p.burst {
			p.tokens = p.burst
		}
	}
	p.last = now
	p.tokens -= float64(n)
	if p.tokens >= 0 {
		return 0
	}
	return time.Duration(-p.tokens / p.rate * float64(time.Second))
}

// sharedPacer is a pacer that several streams draw from at once. Each reservation queues
// behind the debt of the others, so the streams together keep to the rate and each gets
// its turn in the order it asked.
type sharedPacer struct {
	mu sync.Mutex
	p  *pacer
}

func (s *sharedPacer) reserve(now time.Time, n int) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.p.reserve(now, n)
}
