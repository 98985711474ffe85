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
	th, err := newThrottle(ln.Addr().String(), rtt, rate)
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
