package main

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

func TestPacerRate(t *testing.T) {
	const rate = 40e6 // bytes/s
	p := newPacer(rate, 64<<10)
	now := time.Unix(0, 0)
	sent := 0
	for sent < 10e6 {
		now = now.Add(p.reserve(now, 32<<10))
		sent += 32 << 10
	}
	// Everything beyond the initial burst goes at the rate.
	want := time.Duration(float64(sent-64<<10) / rate * float64(time.Second))
	if got := now.Sub(time.Unix(0, 0)); got < want-time.Millisecond || got > want+time.Millisecond {
		t.Errorf("sending %d bytes took %v of simulated time, want %v", sent, got, want)
	}

	// Idle time refills the bucket up to the burst only.
	now = now.Add(time.Hour)
	if d := p.reserve(now, 64<<10); d != 0 {
		t.Errorf("after idling a burst should pass at once, waited %v", d)
	}
	if d := p.reserve(now, 40e3); d != time.Millisecond {
		t.Errorf("a burst does not carry over beyond its size: waited %v, want 1ms", d)
	}
	if d := newPacer(0, 0).reserve(now, 1<<30); d != 0 {
		t.Errorf("rate 0 means unlimited, waited %v", d)
	}
}

// TestThrottleLoopback checks the proxy end to end on loopback: the bytes arrive intact,
// the added round trip and the bandwidth cap show in the elapsed time, and the upstream
// bytes are counted.
func TestThrottleLoopback(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var b [1]byte
				if _, err := io.ReadFull(c, b[:]); err != nil {
					return
				}
				c.Write(payload)
			}()
		}
	}()

	const rtt, rate = 40 * time.Millisecond, 10e6
	th, err := newThrottle(ln.Addr().String(), rtt, rate, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer th.Close()

	fetch := func() ([]byte, time.Duration) {
		t.Helper()
		start := time.Now()
		c, err := net.Dial("tcp", th.Addr())
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

	got, took := fetch()
	if !bytes.Equal(got, payload) {
		t.Fatalf("got %d bytes, not the payload", len(got))
	}
	// handshake RTT + request RTT + (1 MiB - burst) at 10 MB/s ≈ 80ms + 98ms.
	min := 2*rtt + time.Duration(float64(len(payload)-64<<10)/rate*float64(time.Second))
	if took < min || took > min+400*time.Millisecond {
		t.Errorf("shaped fetch took %v, want about %v", took, min)
	}
	if d := th.down.Load(); d != int64(len(payload)) {
		t.Errorf("counted %d bytes down, want %d", d, len(payload))
	}

	th.shaping.Store(false)
	got, took = fetch()
	if !bytes.Equal(got, payload) || took > min/2 {
		t.Errorf("unshaped fetch: %d bytes in %v, want the payload well under %v", len(got), took, min/2)
	}
	if c := th.conns.Load(); c != 2 {
		t.Errorf("counted %d connections, want 2", c)
	}
}

// TestSharedPacer checks the uplink model: streams that draw from one shared pacer keep
// to its rate together, each stream's own cap still holds, and the clock a caller read
// before queueing never makes the bucket run backwards.
func TestSharedPacer(t *testing.T) {
	const total, each = 40e6, 30e6 // two streams of 30 MB/s each behind a 40 MB/s uplink
	shared := &sharedPacer{p: newPacer(total, 64<<10)}
	streams := []*pacer{newPacer(each, 64<<10), newPacer(each, 64<<10)}
	start := time.Unix(0, 0)
	next := []time.Time{start, start} // when each stream may send again
	sent := 0
	for sent < 20e6 {
		i := 0 // the stream that is free first sends next
		if next[1].Before(next[0]) {
			i = 1
		}
		now := next[i]
		wait := max(streams[i].reserve(now, 32<<10), shared.reserve(now, 32<<10))
		next[i] = now.Add(wait)
		sent += 32 << 10
	}
	end := max(next[0].Sub(start), next[1].Sub(start))
	want := time.Duration(float64(sent-64<<10) / total * float64(time.Second))
	if end < want-2*time.Millisecond || end > want+2*time.Millisecond {
		t.Errorf("two streams sent %d bytes through the shared cap in %v of simulated time, want %v", sent, end, want)
	}

	// One stream alone is held to its own rate, not the uplink's.
	alone := newPacer(each, 64<<10)
	up := &sharedPacer{p: newPacer(total, 64<<10)}
	now := start
	for n := 0; n < 10e6; n += 32 << 10 {
		now = now.Add(max(alone.reserve(now, 32<<10), up.reserve(now, 32<<10)))
	}
	if got, min := now.Sub(start), time.Duration(float64(10e6-64<<10)/each*float64(time.Second)); got < min-time.Millisecond {
		t.Errorf("one stream sent 10 MB in %v, faster than its own cap allows (%v)", got, min)
	}

	// A caller that read the clock before another queued is charged from the bucket's
	// time, not back to its own: an earlier reading must not count as negative refill.
	p := newPacer(total, 0)
	later := start.Add(time.Second)
	p.reserve(later, 1)
	if d := p.reserve(start, int(total)); d < time.Second-time.Millisecond || d > time.Second+time.Millisecond {
		t.Errorf("a second's worth of bytes asked with an earlier clock reading waits %v, want 1s", d)
	}
}

// TestThrottleUplink checks the shared cap end to end: two connections that would each
// be allowed the whole rate take together at least as long as the uplink needs for both.
func TestThrottleUplink(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	payload := bytes.Repeat([]byte("x"), 1<<20)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var b [1]byte
				if _, err := io.ReadFull(c, b[:]); err == nil {
					c.Write(payload)
				}
			}()
		}
	}()
	const rate = 8e6
	th, err := newThrottle(ln.Addr().String(), 0, rate, rate)
	if err != nil {
		t.Fatal(err)
	}
	defer th.Close()
	start := time.Now()
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			c, err := net.Dial("tcp", th.Addr())
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if _, err := c.Write([]byte{1}); err != nil {
				errs <- err
				return
			}
			got, err := io.ReadAll(c)
			if err == nil && !bytes.Equal(got, payload) {
				err = io.ErrUnexpectedEOF
			}
			errs <- err
		}()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	// Only a lower bound: a loaded machine may be slower, never faster than the cap.
	if took, min := time.Since(start), time.Duration(float64(2*len(payload)-2*64<<10)/rate*float64(time.Second)); took < min {
		t.Errorf("two connections moved %d bytes in %v, faster than the %g B/s uplink allows (%v)", 2*len(payload), took, float64(rate), min)
	}
	if d := th.down.Load(); d != 2*int64(len(payload)) {
		t.Errorf("counted %d bytes down, want %d", d, 2*len(payload))
	}
}
