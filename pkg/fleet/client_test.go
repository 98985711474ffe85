package fleet

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// fakePeer is a peer API that misbehaves at the TCP level: serve gets each connection
// after the request headers were read.
func fakePeer(t *testing.T, serve func(c net.Conn, req *http.Request)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	t.Cleanup(func() {
		close(done)
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				serve(c, req)
				<-done // hold the connection open: a stalled peer, not a closed one
			})
		}
	})
	return ln.Addr().String()
}

const (
	// No case waits on a dial (a closed port refuses at once), but a loopback dial of a
	// -race test beside CPU hogs has taken over 500 ms: a short dial timeout made a
	// refusing peer look down.
	testDial   = 2 * time.Second
	testHeader = 600 * time.Millisecond
	testIdle   = 600 * time.Millisecond
	// quickly is how long a failure may take beyond its timeout on a loaded machine. It
	// stays below the defaults (3 s, 5 s): a fetch that waited for those did not honour
	// its configuration.
	quickly = 2500 * time.Millisecond
)

func withTimeouts(c *Config) {
	c.DialTimeout, c.HeaderTimeout, c.IdleTimeout = testDial, testHeader, testIdle
}

func TestFetchFromMisbehavingPeers(t *testing.T) {
	const length = 64 << 10
	blob := testBlob(length * 2)
	req := chunkReq(blob, 0, length)
	head := func(cl int64) string {
		return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n", cl)
	}
	closed := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		return addr
	}
	tests := []struct {
		name   string
		addr   func(t *testing.T) string
		reason string
		// atFetch: Fetch itself fails; otherwise the body does, before its end.
		atFetch  bool
		status   int
		sentinel error
		soft     bool // counts as a soft failure: Owners skips the peer for a while
	}{
		{name: "nothing listens", addr: func(*testing.T) string { return closed() }, reason: FallbackDown, atFetch: true, soft: true},
		{name: "accepts, sends nothing", addr: func(t *testing.T) string {
			return fakePeer(t, func(net.Conn, *http.Request) {})
		}, reason: FallbackTimeout, atFetch: true, soft: true},
		{name: "headers, then stalls", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) { io.WriteString(c, head(length)) })
		}, reason: FallbackTimeout, soft: true},
		{name: "half the body, then stalls", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, head(length))
				c.Write(blob[:length/2])
			})
		}, reason: FallbackTimeout, soft: true},
		{name: "all but the last byte, then stalls", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, head(length))
				c.Write(blob[:length-1])
			})
		}, reason: FallbackTimeout, soft: true},
		{name: "trickles a byte at a time, never idle for long", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, head(length))
				for i := range length { // until the client gives up and the write fails
					if _, err := c.Write(blob[i : i+1]); err != nil {
						return
					}
					time.Sleep(testIdle / 3)
				}
			})
		}, reason: FallbackTimeout, soft: true},
		{name: "short body, then closes", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, head(length))
				c.Write(blob[:length/2])
				c.Close()
			})
		}, reason: FallbackError, soft: true},
		{name: "Content-Length too small", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, head(length-1))
				c.Write(blob[:length-1])
			})
		}, reason: FallbackError, atFetch: true, status: 200, soft: true},
		{name: "Content-Length too large", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, head(length+1))
				c.Write(blob[:length+1])
			})
		}, reason: FallbackError, atFetch: true, status: 200, soft: true},
		{name: "chunked, no Content-Length", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
				fmt.Fprintf(c, "%x\r\n%s\r\n0\r\n\r\n", length, blob[:length])
			})
		}, reason: FallbackError, atFetch: true, status: 200, soft: true},
		{name: "redirect", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n")
			})
		}, reason: FallbackError, atFetch: true, status: 307, soft: true},
		{name: "500", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
			})
		}, reason: FallbackError, atFetch: true, status: 500, soft: true},
		{name: "401", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
			})
		}, reason: FallbackRefused, atFetch: true, status: 401, sentinel: ErrUnauthorized, soft: true},
		{name: "404 is an answer", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
			})
		}, reason: FallbackError, atFetch: true, status: 404, sentinel: ErrNotFound},
		{name: "503 is an answer", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
			})
		}, reason: FallbackError, atFetch: true, status: 503, sentinel: ErrUnavailable},
		{name: "429 is an answer", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n\r\n")
			})
		}, reason: FallbackRefused, atFetch: true, status: 429, sentinel: ErrTooManyRequests},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := startNode(t, "node-a", nil, withTimeouts)
			fake := addFakeMember(n.Fleet, "fake", tt.addr(t))
			if !slices.Contains(names(n.Owners(req.Digest, 0)), "fake") {
				t.Fatal("the fake member is not among the owners to begin with")
			}
			start := time.Now()
			rc, err := n.Fetch(context.Background(), fake, req)
			if err == nil {
				if tt.atFetch {
					rc.Close()
					t.Fatal("Fetch succeeded")
				}
				var got []byte
				got, err = io.ReadAll(rc)
				rc.Close()
				if err == nil {
					t.Fatalf("read %d bytes and a clean end from a broken peer", len(got))
				}
				if len(got) >= length {
					t.Fatalf("read all %d bytes, then %v", len(got), err)
				}
			} else if !tt.atFetch {
				t.Fatalf("Fetch: %v; want the body to fail", err)
			}
			status := tt.status
			if status == 0 {
				status = anyStatus
			}
			checkFetchError(t, err, time.Since(start), tt.reason, status, tt.sentinel)
			skipped := !slices.Contains(names(n.Owners(req.Digest, 0)), "fake")
			if skipped != tt.soft {
				t.Errorf("skipped by Owners: %v, want %v", skipped, tt.soft)
			}
		})
	}
}

// addFakeMember puts a live member into f's table as if memberlist had reported it.
func addFakeMember(f *Fleet, name, peerAddr string) Member {
	m := Member{Name: name, GossipAddr: "127.0.0.1:1", PeerAddr: peerAddr, State: StateAlive}
	f.mu.Lock()
	f.peers[name] = &peer{Member: m, since: time.Now()}
	f.mu.Unlock()
	return m
}

func TestFetchCallerCancelIsNotThePeersFault(t *testing.T) {
	n := startNode(t, "node-a", nil, withTimeouts)
	stall := addFakeMember(n.Fleet, "stall", fakePeer(t, func(c net.Conn, _ *http.Request) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
	}))
	blob := testBlob(1000)
	ctx, cancel := context.WithCancel(context.Background())
	rc, err := n.Fetch(ctx, stall, chunkReq(blob, 0, 100))
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := io.ReadAll(rc); !errors.Is(err, context.Canceled) {
		t.Fatalf("read after cancel: %v", err)
	}
	rc.Close()
	if !slices.Contains(names(n.Owners(digest.FromBytes(blob), 0)), "stall") {
		t.Fatal("a peer was put in backoff because our caller went away")
	}
}

func TestSoftFailureBackoffAndRecovery(t *testing.T) {
	blob := testBlob(4096)
	a := startNode(t, "node-a", newBlobSource(blob))
	b := startNode(t, "node-b", nil, func(c *Config) {
		withTimeouts(c)
		c.health = healthPolicy{faultLimit: 3, faultWindow: time.Hour, quarantine: time.Hour,
			softBase: 200 * time.Millisecond, softMax: 400 * time.Millisecond}
	}, withJoin(a.GossipAddr()))
	waitFor(t, "two members", convergeDeadline, func() bool { return len(liveNames(b.Fleet)) == 2 })
	d := digest.FromBytes(blob)
	real := Member{Name: "node-a", PeerAddr: a.cfg.PeerAdvertise}

	// A failure (here: asking node-a at a dead address) puts it in backoff...
	if _, err := b.Fetch(context.Background(), Member{Name: "node-a", PeerAddr: "127.0.0.1:1"}, chunkReq(blob, 0, 10)); FallbackReason(err) != FallbackDown {
		t.Fatalf("Fetch from a dead address: %v", err)
	}
	if slices.Contains(names(b.Owners(d, 0)), "node-a") {
		t.Fatal("node-a is still an owner right after a failure")
	}
	// ...which ends by itself,
	waitFor(t, "backoff ends", convergeDeadline, func() bool { return slices.Contains(names(b.Owners(d, 0)), "node-a") })
	// and a success resets the count, so the next failure backs off from the start.
	for range 3 {
		b.Fetch(context.Background(), Member{Name: "node-a", PeerAddr: "127.0.0.1:1"}, chunkReq(blob, 0, 10))
	}
	rc, err := b.Fetch(context.Background(), real, chunkReq(blob, 0, 10))
	if err != nil {
		t.Fatalf("Fetch from node-a: %v", err)
	}
	rc.Close()
	if !slices.Contains(names(b.Owners(d, 0)), "node-a") {
		t.Fatal("a successful fetch did not end the backoff")
	}
}

func TestFaultsQuarantine(t *testing.T) {
	n := startNode(t, "node-a", nil, func(c *Config) {
		c.health = healthPolicy{faultLimit: 3, faultWindow: time.Hour, quarantine: 300 * time.Millisecond,
			softBase: time.Second, softMax: time.Second}
	})
	addFakeMember(n.Fleet, "liar", "127.0.0.1:1")
	d := digest.FromString("x")
	for i := range 2 {
		n.ReportFault("liar")
		if !slices.Contains(names(n.Owners(d, 0)), "liar") {
			t.Fatalf("quarantined after %d faults; the limit is 3", i+1)
		}
	}
	n.ReportFault("liar")
	if slices.Contains(names(n.Owners(d, 0)), "liar") {
		t.Fatal("not quarantined after 3 faults")
	}
	var st PeerStats
	for _, s := range n.Stats() {
		if s.Name == "liar" {
			st = s
		}
	}
	if st.Faults != 3 || st.QuarantinedUntil.IsZero() {
		t.Fatalf("stats %+v; want 3 faults and a quarantine", st)
	}
	if got := metricValue(t, n.reg, "node_mirror_peer_faults_total"); got != 3 {
		t.Fatalf("node_mirror_peer_faults_total = %v", got)
	}
	waitFor(t, "quarantine ends", convergeDeadline, func() bool { return slices.Contains(names(n.Owners(d, 0)), "liar") })
	// A node never quarantines itself, whatever it is told; unknown names change nothing.
	for range 5 {
		n.ReportFault("node-a")
		n.ReportFault("nobody")
	}
	if got := names(n.Owners(d, 0)); !slices.Contains(got, "node-a") || slices.Contains(got, "nobody") {
		t.Fatalf("owners %v", got)
	}
}

func TestFaultWindow(t *testing.T) {
	pol := healthPolicy{faultLimit: 3, faultWindow: time.Minute, quarantine: time.Hour}
	var p peer
	t0 := time.Unix(1_000_000, 0)
	// Faults spread wider than the window never add up to a quarantine.
	for i := range 10 {
		if p.fault(t0.Add(time.Duration(i)*40*time.Second), pol) {
			t.Fatalf("quarantined at fault %d, 40 s apart with a 1 min window", i+1)
		}
	}
	if p.faultTotal != 10 || len(p.faults) > pol.faultLimit {
		t.Fatalf("total %d, kept %d", p.faultTotal, len(p.faults))
	}
	// Three within it do.
	t1 := t0.Add(time.Hour)
	p.fault(t1, pol)
	p.fault(t1.Add(time.Second), pol)
	if !p.fault(t1.Add(2*time.Second), pol) {
		t.Fatal("3 faults in 2 s did not quarantine")
	}
	if p.eligible(t1.Add(30 * time.Minute)) {
		t.Fatal("eligible during quarantine")
	}
}

func TestNoteFallbackBoundsLabels(t *testing.T) {
	n := startNode(t, "node-a", nil)
	for _, r := range []string{FallbackDown, FallbackTimeout, "made-up", FallbackFault} {
		n.NoteFallback(r)
	}
	for r, want := range map[string]float64{FallbackDown: 1, FallbackTimeout: 1, FallbackFault: 1, FallbackError: 1, FallbackRefused: 0} {
		if got := metricValue(t, n.reg, "node_mirror_peer_fallbacks_total", "reason", r); got != want {
			t.Errorf("fallbacks{reason=%s} = %v, want %v", r, got, want)
		}
	}
	mfs, _ := n.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "node_mirror_peer_fallbacks_total" && len(mf.GetMetric()) != 5 {
			t.Fatalf("%d reason labels, want the 5 defined", len(mf.GetMetric()))
		}
	}
}

func TestFetchManifestFromMisbehavingPeers(t *testing.T) {
	const bound = 4096
	body := testManifestBody(1000)
	req := manifestReq(digest.FromBytes(body))
	head := func(ct string, cl int) string {
		return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n", ct, cl)
	}
	// answer is a peer that sends s and then holds the connection open.
	answer := func(s ...string) func(t *testing.T) string {
		return func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) { io.WriteString(c, strings.Join(s, "")) })
		}
	}
	closed := func(*testing.T) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		return addr
	}
	big := string(testManifestBody(bound + 1))
	tests := []struct {
		name string
		addr func(t *testing.T) string
		// want, when set, is the body of a success, and wantType its media type.
		want     []byte
		wantType string
		reason   string
		status   int
		sentinel error
		soft     bool // counts as a soft failure: Owners skips the peer for a while
		readNone bool // refused before reading a byte of the body
	}{
		{name: "ok", addr: answer(head(ociManifest, len(body)), string(body)), want: body, wantType: ociManifest},
		{name: "exactly the bound", addr: answer(head(ociManifest, bound), string(testManifestBody(bound))),
			want: testManifestBody(bound), wantType: ociManifest},
		{name: "media type with parameters, upper case", addr: answer(head("Application/VND.OCI.Image.Manifest.v1+JSON; charset=utf-8", len(body)), string(body)),
			want: body, wantType: ociManifest},

		{name: "nothing listens", addr: closed, reason: FallbackDown, soft: true},
		{name: "accepts, sends nothing", addr: answer(), reason: FallbackTimeout, soft: true},
		{name: "headers, then stalls", addr: answer(head(ociManifest, len(body))), reason: FallbackTimeout, status: 200, soft: true},
		{name: "half the body, then stalls", addr: answer(head(ociManifest, len(body)), string(body[:500])), reason: FallbackTimeout, status: 200, soft: true},
		{name: "all but the last byte, then stalls", addr: answer(head(ociManifest, len(body)), string(body[:999])), reason: FallbackTimeout, status: 200, soft: true},
		{name: "short body, then closes", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, head(ociManifest, len(body))+string(body[:500]))
				c.Close()
			})
		}, reason: FallbackError, status: 200, soft: true},
		{name: "Content-Length one more than the body, then closes", addr: func(t *testing.T) string {
			return fakePeer(t, func(c net.Conn, _ *http.Request) {
				io.WriteString(c, head(ociManifest, len(body)+1)+string(body))
				c.Close()
			})
		}, reason: FallbackError, status: 200, soft: true},
		{name: "Content-Length one over the bound", addr: answer(head(ociManifest, bound+1), big),
			reason: FallbackError, status: 200, soft: true, readNone: true},
		{name: "Content-Length of a GiB", addr: answer(head(ociManifest, 1<<30), big),
			reason: FallbackError, status: 200, soft: true, readNone: true},
		{name: "chunked, no Content-Length", addr: answer("HTTP/1.1 200 OK\r\nContent-Type: "+ociManifest+"\r\nTransfer-Encoding: chunked\r\n\r\n",
			fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(body), body)), reason: FallbackError, status: 200, soft: true, readNone: true},
		{name: "chunked, over the bound", addr: answer("HTTP/1.1 200 OK\r\nContent-Type: "+ociManifest+"\r\nTransfer-Encoding: chunked\r\n\r\n",
			fmt.Sprintf("%x\r\n%s\r\n", len(big), big)), reason: FallbackError, status: 200, soft: true, readNone: true},
		{name: "Content-Length not a number", addr: answer("HTTP/1.1 200 OK\r\nContent-Type: "+ociManifest+"\r\nContent-Length: 1e3\r\n\r\n", string(body)),
			reason: FallbackError, soft: true, readNone: true},
		{name: "no Content-Type", addr: answer(fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", len(body)), string(body)),
			reason: FallbackError, status: 200, soft: true, readNone: true},
		{name: "two Content-Types", addr: answer(fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n", ociManifest, len(body)), string(body)),
			reason: FallbackError, status: 200, soft: true, readNone: true},
		{name: "Content-Type without subtype", addr: answer(head("manifest", len(body)), string(body)),
			reason: FallbackError, status: 200, soft: true, readNone: true},
		{name: "Content-Type unparsable", addr: answer(head("application/json; charset", len(body)), string(body)),
			reason: FallbackError, status: 200, soft: true, readNone: true},
		{name: "Content-Type too long", addr: answer(head("application/"+strings.Repeat("x", 250), len(body)), string(body)),
			reason: FallbackError, status: 200, soft: true, readNone: true},
		{name: "redirect", addr: answer("HTTP/1.1 307 Temporary Redirect\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n"),
			reason: FallbackError, status: 307, soft: true, readNone: true},
		{name: "500", addr: answer("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
			reason: FallbackError, status: 500, soft: true, readNone: true},
		{name: "401", addr: answer("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"),
			reason: FallbackRefused, status: 401, sentinel: ErrUnauthorized, soft: true, readNone: true},
		{name: "404 is an answer", addr: answer("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
			reason: FallbackError, status: 404, sentinel: ErrNotFound, readNone: true},
		{name: "503 is an answer", addr: answer("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"),
			reason: FallbackError, status: 503, sentinel: ErrUnavailable, readNone: true},
		{name: "429 is an answer", addr: answer("HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n\r\n"),
			reason: FallbackRefused, status: 429, sentinel: ErrTooManyRequests, readNone: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := startNode(t, "node-a", nil, withTimeouts, func(c *Config) { c.MaxManifestSize = bound })
			fake := addFakeMember(n.Fleet, "fake", tt.addr(t))
			start := time.Now()
			got, mt, err := n.FetchManifest(context.Background(), fake, req)
			elapsed := time.Since(start)
			in := statsOf(t, n.Fleet, "fake").BytesIn
			if tt.want != nil {
				if err != nil || !bytes.Equal(got, tt.want) || mt != tt.wantType {
					t.Fatalf("got %d bytes, media type %q, err %v; want the %d bytes, %q", len(got), mt, err, len(tt.want), tt.wantType)
				}
				if in != int64(len(tt.want)) {
					t.Fatalf("bytes in counted %d, want %d", in, len(tt.want))
				}
				if !slices.Contains(names(n.Owners(req.Digest, 0)), "fake") {
					t.Fatal("a successful fetch put the peer in backoff")
				}
				return
			}
			if err == nil {
				t.Fatalf("FetchManifest succeeded: %d bytes, %q", len(got), mt)
			}
			if got != nil || mt != "" {
				t.Fatalf("a failure returned %d bytes and media type %q", len(got), mt)
			}
			checkFetchError(t, err, elapsed, tt.reason, tt.status, tt.sentinel)
			if in > bound || (tt.readNone && in != 0) {
				t.Errorf("read %d bytes of the body (bound %d, read none: %v)", in, bound, tt.readNone)
			}
			skipped := !slices.Contains(names(n.Owners(req.Digest, 0)), "fake")
			if skipped != tt.soft {
				t.Errorf("skipped by Owners: %v, want %v", skipped, tt.soft)
			}
		})
	}
}

func statsOf(t *testing.T, f *Fleet, name string) PeerStats {
	t.Helper()
	for _, s := range f.Stats() {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("%s has no stats for %s", f.Name(), name)
	return PeerStats{}
}

func TestFetchManifestCallerCancelIsNotThePeersFault(t *testing.T) {
	// The idle timeout is far away: only the cancel can end this fetch.
	n := startNode(t, "node-a", nil, func(c *Config) { c.IdleTimeout = 10 * time.Minute })
	stall := addFakeMember(n.Fleet, "stall", fakePeer(t, func(c net.Conn, _ *http.Request) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: "+ociManifest+"\r\nContent-Length: 100\r\n\r\n0123456789")
	}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	d := digest.FromString("m")
	go func() {
		_, _, err := n.FetchManifest(ctx, stall, manifestReq(d))
		done <- err
	}()
	// Cancel once the body is being read: the first bytes were counted in.
	waitFor(t, "the first bytes", convergeDeadline, func() bool { return statsOf(t, n.Fleet, "stall").BytesIn == 10 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("FetchManifest after cancel: %v", err)
	}
	if !slices.Contains(names(n.Owners(d, 0)), "stall") {
		t.Fatal("a peer was put in backoff because our caller went away")
	}
}

func TestFetchManifestRefusesInvalidRequests(t *testing.T) {
	n := startNode(t, "node-a", nil)
	var asked atomic.Int32
	m := addFakeMember(n.Fleet, "fake", fakePeer(t, func(net.Conn, *http.Request) { asked.Add(1) }))
	good := manifestReq(digest.FromString("m"))
	for _, tt := range []struct {
		name string
		edit func(r *ManifestRequest)
	}{
		{"no digest", func(r *ManifestRequest) { r.Digest = "" }},
		{"md5", func(r *ManifestRequest) { r.Digest = "md5:d41d8cd98f00b204e9800998ecf8427e" }},
		{"tag", func(r *ManifestRequest) { r.Digest = "latest" }},
		{"registry with path", func(r *ManifestRequest) { r.Registry = "docker.io/x" }},
		{"repo with query", func(r *ManifestRequest) { r.Repo = "library/nginx?x=1" }},
		{"hop 2", func(r *ManifestRequest) { r.Hop = 2 }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := good
			tt.edit(&r)
			if _, _, err := n.FetchManifest(context.Background(), m, r); FallbackReason(err) != FallbackError {
				t.Fatalf("FetchManifest(%+v): %v; want a FallbackError", r, err)
			}
		})
	}
	if asked.Load() != 0 {
		t.Fatalf("the peer was asked %d times for invalid requests", asked.Load())
	}
}

// anyStatus, as checkFetchError's status, accepts whatever status the error carries.
const anyStatus = -1

// checkFetchError checks a failure to fetch from the fake member: within quickly, a
// *FetchError naming it with reason, status (unless anyStatus) and, when not nil, sentinel.
func checkFetchError(t *testing.T, err error, elapsed time.Duration, reason string, status int, sentinel error) {
	t.Helper()
	t.Logf("failed after %v: %v", elapsed.Round(time.Millisecond), err)
	if elapsed > quickly {
		t.Errorf("took %v; the timeouts are %v, %v, %v", elapsed, testDial, testHeader, testIdle)
	}
	fe, ok := errors.AsType[*FetchError](err)
	if !ok {
		t.Fatalf("error %T %v is not a *FetchError", err, err)
	}
	if fe.Reason != reason || FallbackReason(err) != reason || fe.Peer != "fake" {
		t.Errorf("reason %q, peer %q; want %q, fake", fe.Reason, fe.Peer, reason)
	}
	if status != anyStatus && fe.Status != status {
		t.Errorf("status %d, want %d", fe.Status, status)
	}
	if sentinel != nil && !errors.Is(err, sentinel) {
		t.Errorf("errors.Is(%v, %v) is false", err, sentinel)
	}
}
