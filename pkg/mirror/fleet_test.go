package mirror

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/testenv"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/fleet"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// member is one node of an in-process fleet: a mirror, its fleet membership and its peer
// API, all on loopback.
type member struct {
	*testMirror
	fleet    *fleet.Fleet
	peerAddr string
	peerLn   net.Listener
}

const testChunk = 256 << 10

// startMember starts a mirror of up in a fleet with key, joining join (gossip addresses).
// advertise, when set, wraps the peer address the others are told (a lying proxy).
// More options change the fleet's configuration.
func startMember(t *testing.T, name string, up *testenv.Upstream, key []byte, join []string, advertise func(real string) string, more ...func(*fleet.Config)) *member {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	adv := ln.Addr().String()
	if advertise != nil {
		adv = advertise(adv)
	}
	cfg := fleet.Config{
		NodeName: name, GossipListen: "127.0.0.1:0", PeerAdvertise: adv, Join: join, Key: key,
		Logger: nopLogger(), DialTimeout: time.Second, HeaderTimeout: 10 * time.Second, IdleTimeout: 10 * time.Second,
	}
	for _, f := range more {
		f(&cfg)
	}
	f, err := fleet.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	store, err := contentstore.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	uo := testClient
	uo.Logger = nopLogger()
	c, err := upstream.New("docker.io", []string{up.URL()}, "", "", uo)
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(Options{
		Store: store, Registries: map[string]*upstream.Client{"docker.io": c}, DefaultRegistry: "docker.io",
		Logger: testLogger(), Fleet: f, FetchChunkSize: testChunk, EagerFetch: 0,
	})
	if err != nil {
		t.Fatal(err)
	}
	go f.Serve(ln, m)
	srv := httptest.NewServer(m)
	mb := &member{testMirror: &testMirror{Mirror: m, srv: srv, store: store}, fleet: f, peerAddr: ln.Addr().String(), peerLn: ln}
	t.Cleanup(func() {
		srv.Close()
		f.Close()
		m.Close()
		store.Close()
	})
	return mb
}

// waitMembers waits until every member sees n live members.
func waitMembers(t *testing.T, n int, ms ...*member) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ok := true
		for _, m := range ms {
			live := 0
			for _, x := range m.fleet.Members() {
				if x.State == fleet.StateAlive {
					live++
				}
			}
			ok = ok && live == n
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("members did not converge on %d", n)
		}
	}
}

// upstreamBytes counts blob body bytes the upstream sent, and throttles each response.
type upstreamBytes struct {
	n    atomic.Int64
	rate int64 // bytes a second per response
}

func (u *upstreamBytes) wrap(up *testenv.Upstream) {
	inner := up.Faults
	up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/blobs/") || r.Method != http.MethodGet {
			return false
		}
		inner.ServeHTTP(&testenv.PacedWriter{ResponseWriter: w, Rate: u.rate, Sent: &u.n}, r)
		return true
	})
}

func fleetKey(t *testing.T) []byte {
	k := make([]byte, 32)
	rand.Read(k)
	return k
}

func imageBytes(t *testing.T, img v1.Image) int64 {
	t.Helper()
	var n int64
	layers, _ := img.Layers()
	for _, l := range layers {
		s, _ := l.Size()
		n += s
	}
	cfg, _ := img.RawConfigFile()
	return n + int64(len(cfg))
}

// TestFleetPullsEachByteOnce (issue 13): four members pull a fresh image at the same
// moment; each gets it right, and the upstream sends the image's bytes about once. A fifth
// member joining later pulls it without any upstream blob bytes.
func TestFleetPullsEachByteOnce(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 2<<20, 2)
	up.Push("library/app", "v1", img)
	ub := &upstreamBytes{rate: 4 << 20}
	ub.wrap(up)
	key := fleetKey(t)
	first := startMember(t, "n0", up, key, nil, nil)
	ms := []*member{first}
	for i := 1; i < 4; i++ {
		ms = append(ms, startMember(t, fmt.Sprint("n", i), up, key, []string{first.fleet.GossipAddr()}, nil))
	}
	waitMembers(t, 4, ms...)

	var wg sync.WaitGroup
	for _, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m.pull(t, "library/app:v1") // validates every blob's digest
		}()
	}
	wg.Wait()
	size := imageBytes(t, img)
	sent := ub.n.Load()
	md, _ := img.Digest()
	if n := up.CountPath(http.MethodGet, "/v2/library/app/manifests/v1") + up.CountPath(http.MethodGet, "/v2/library/app/manifests/"+md.String()); n != 1 {
		t.Errorf("4 members made %d manifest GETs upstream, want 1 (the owner's; tags are resolved with HEADs)", n)
	}
	t.Logf("4 members pulled a %d-byte image; upstream sent %d blob bytes (%.2fx)", size, sent, float64(sent)/float64(size))
	if float64(sent) > 1.1*float64(size) {
		t.Errorf("upstream sent %d blob bytes for a %d-byte image to 4 members, want at most 1.1x", sent, size)
	}
	for _, m := range ms {
		assertStoreIntact(t, m.testMirror)
	}

	late := startMember(t, "n4", up, key, []string{first.fleet.GossipAddr()}, nil)
	waitMembers(t, 5, append(ms, late)...)
	before := ub.n.Load()
	late.pull(t, "library/app:v1")
	if n := ub.n.Load() - before; n != 0 {
		t.Errorf("the member that joined later took %d blob bytes from upstream, want 0", n)
	}
}

// TestFleetLyingMember (issue 13): a member whose peer API is behind a proxy that flips a
// byte of everything it sends never makes another member serve a complete wrong response
// or store a wrong blob; the blob comes right from upstream, and the liar is reported.
func TestFleetLyingMember(t *testing.T) {
	up := newUpstream(t)
	blob := make([]byte, 2<<20)
	rand.Read(blob)
	d := digest.FromBytes(blob)
	rb := &rangedBlob{blob: blob, path: "/v2/library/app/blobs/" + d.String(), pause: time.Millisecond}
	rb.install(up)
	key := fleetKey(t)
	honest := startMember(t, "honest", up, key, nil, nil)
	liar := startMember(t, "liar", up, key, []string{honest.fleet.GossipAddr()}, flippingProxy(t))
	waitMembers(t, 2, honest, liar)
	// The liar gets the blob first, so the honest member asks it for the chunks it owns.
	if status, body, clean := fetch(t, liar.srv.URL+rb.path); status != 200 || !clean || !bytes.Equal(body, blob) {
		t.Fatalf("liar's own pull: %d clean %v", status, clean)
	}
	owned := 0
	for k := int64(0); k*testChunk < int64(len(blob)); k++ {
		if honest.fleet.Owners(d, k)[0].Name == "liar" {
			owned++
		}
	}
	if owned == 0 {
		t.Fatal("the liar owns no chunk of the blob; the test proves nothing")
	}
	status, body, clean := fetch(t, honest.srv.URL+rb.path)
	if status == 200 && clean && !bytes.Equal(body, blob) {
		t.Fatal("a complete response of wrong bytes from members")
	}
	// Whatever the first answer, the blob is fetched again from upstream and stored right.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := honest.store.Size(d); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the blob was not fetched again after members' bytes failed")
		}
	}
	assertStoreIntact(t, honest.testMirror)
	if status, body, clean := fetch(t, honest.srv.URL+rb.path); status != 200 || !clean || !bytes.Equal(body, blob) {
		t.Fatalf("after the refetch: %d clean %v", status, clean)
	}
	var faults int64
	for _, s := range honest.fleet.Stats() {
		if s.Name == "liar" {
			faults = s.Faults
		}
	}
	if faults == 0 {
		t.Fatal("the liar was not reported")
	}
}

// flippingProxy returns an advertise function that puts a proxy flipping one byte of each
// response body in front of the real peer address.
func flippingProxy(t *testing.T) func(string) string {
	return func(real string) string {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			req, _ := http.NewRequestWithContext(r.Context(), r.Method, "http://"+real+r.URL.RequestURI(), nil)
			req.Header = r.Header.Clone()
			resp, err := http.DefaultTransport.RoundTrip(req)
			if err != nil {
				w.WriteHeader(http.StatusBadGateway)
				return
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if len(body) > 0 && resp.StatusCode == http.StatusOK {
				body[len(body)/2] ^= 0xff
			}
			for k, v := range resp.Header {
				w.Header()[k] = v
			}
			w.WriteHeader(resp.StatusCode)
			w.Write(body)
		}))
		t.Cleanup(srv.Close)
		return strings.TrimPrefix(srv.URL, "http://")
	}
}

// TestFleetMemberWithAnotherKey (issue 13): a node with another key is not admitted, and
// its peer requests are refused.
func TestFleetMemberWithAnotherKey(t *testing.T) {
	up := newUpstream(t)
	a := startMember(t, "a", up, fleetKey(t), nil, nil)
	bLog := &logCount{n: map[string]int{}}
	b := startMember(t, "b", up, fleetKey(t), []string{a.fleet.GossipAddr()}, nil,
		func(c *fleet.Config) { c.Logger = slog.New(bLog) })
	// b retries joining in the background. Judge once it has tried, and failed, twice:
	// each attempt is a whole exchange with a, so a has seen b's key by then.
	const failed = "fleet: no member to join yet; retrying"
	admitted := func() bool {
		for _, m := range a.fleet.Members() {
			if m.Name == "b" {
				return true
			}
		}
		return false
	}
	for deadline := time.Now().Add(30 * time.Second); bLog.count(failed) < 2 && !admitted(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("b logged %d failed joins within 30s, want 2", bLog.count(failed))
		}
	}
	if admitted() {
		t.Fatal("a member with another key was admitted")
	}
	if ms := b.fleet.Members(); len(ms) != 1 || ms[0].Name != "b" {
		t.Fatalf("b, with another key, sees %v", ms)
	}
	blob := []byte("secret layer")
	d := digest.FromBytes(blob)
	_, err := b.fleet.Fetch(context.Background(), fleet.Member{Name: "a", PeerAddr: a.peerAddr}, fleet.ChunkRequest{
		Registry: "docker.io", Repo: "library/app", Digest: d, Size: int64(len(blob)), Offset: 0, Length: int64(len(blob)),
	})
	if err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("a request signed with another key: %v, want 401", err)
	}
}

// TestFleetOwnerDown (issue 13): an owner that vanishes mid-pull costs a fallback to
// upstream for its chunks, never a failed pull.
func TestFleetOwnerDown(t *testing.T) {
	up := newUpstream(t)
	rb := newRangedBlob(3 << 20)
	rb.install(up)
	key := fleetKey(t)
	a := startMember(t, "a", up, key, nil, nil)
	b := startMember(t, "b", up, key, []string{a.fleet.GossipAddr()}, nil)
	waitMembers(t, 2, a, b)
	b.peerLn.Close() // b's peer API is gone; memberlist still lists it for a while
	status, body, clean := fetch(t, a.srv.URL+rb.path)
	if status != 200 || !clean || !bytes.Equal(body, rb.blob) {
		t.Fatalf("pull with the owner down: %d clean %v right %v", status, clean, bytes.Equal(body, rb.blob))
	}
	assertStoreIntact(t, a.testMirror)
}

func testLogger() *slog.Logger {
	if os.Getenv("MIRROR_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return nopLogger()
}

// logCount is a slog handler that counts records by message, at every level.
type logCount struct {
	mu sync.Mutex
	n  map[string]int
}

func (l *logCount) Enabled(context.Context, slog.Level) bool { return true }
func (l *logCount) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logCount) WithGroup(string) slog.Handler            { return l }

func (l *logCount) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	l.n[r.Message]++
	l.mu.Unlock()
	return nil
}

func (l *logCount) count(msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n[msg]
}

// TestPreviousOwnerDoesNotWaitOnAClaimedChunk: a member asking this node as the previous
// owner (hop 1) for a chunk this node has just claimed, before its fill named a source,
// gets "not here" at once. Served instead, the two members could wait on each other until
// the idle timeout (make bench caught it in a third of its fleet runs).
func TestPreviousOwnerDoesNotWaitOnAClaimedChunk(t *testing.T) {
	up := testenv.NewUpstream(t)
	a := startMember(t, "a", up, fleetKey(t), nil, nil)
	blob := bytes.Repeat([]byte("x"), 2*testChunk)
	d := digest.FromBytes(blob)
	c, _ := a.chunks.chunk(d, 1, int64(len(blob)), testChunk, true)
	defer c.release()
	if !c.claim() {
		t.Fatal("could not claim a new chunk")
	}
	defer c.unclaim(nil)
	req := fleet.ChunkRequest{Registry: "docker.io", Repo: "library/app", Digest: d, Size: int64(len(blob)),
		Offset: testChunk, Length: testChunk, Hop: 1}
	r, err := a.OpenChunk(context.Background(), req)
	if err == nil {
		r.Close()
		t.Fatal("a hop-1 request was served from a chunk whose fill has not said where it reads from")
	}
	if !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("hop-1 request: %v, want not found", err)
	}
}

// A member's request states a blob's size, and a wrong one must not shape the chunks of
// this node's own download of the blob: here it would end the blob one byte into chunk 1.
func TestFleetMemberSizeDoesNotShapeOwnDownload(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 3*testChunk, 1)
	up.Push("library/app", "v1", img)
	m := startMember(t, "n0", up, fleetKey(t), nil, nil)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	rc, err := m.OpenChunk(context.Background(), fleet.ChunkRequest{
		Registry: "docker.io", Repo: "library/app", Digest: digest.Digest(ld.String()),
		Size: testChunk + 1, Offset: testChunk, Length: 1,
	})
	if err == nil {
		b, err := io.ReadAll(rc)
		rc.Close()
		if err == nil {
			t.Fatalf("a chunk of a blob of the wrong size was served whole: %d bytes", len(b))
		}
	}
	m.pull(t, "library/app:v1") // validates every blob
	assertStoreIntact(t, m.testMirror)
}

// Any manifest of any registry may name a digest with a size that is not the blob's. A
// fleet download sized by it fails, and the next request asks upstream for the size.
func TestFleetWrongSizeFromAManifest(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 3*testChunk, 1)
	up.Push("library/app", "v1", img)
	m := startMember(t, "n0", up, fleetKey(t), nil, nil)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	ls, _ := layers[0].Size()
	m.noteSizes(fmt.Appendf(nil, `{"schemaVersion":2,"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":%q,"size":%d}]}`, ld, ls-1000), "")
	url := m.srv.URL + "/v2/library/app/blobs/" + ld.String()
	status, body, clean := fetch(t, url)
	if status == http.StatusOK && clean && digest.FromBytes(body).String() != ld.String() {
		t.Fatalf("a complete response of %d wrong bytes", len(body))
	}
	if status != http.StatusOK || !clean {
		t.Logf("the request sized by the manifest failed (%d, clean %v); asking again", status, clean)
		status, body, clean = fetch(t, url)
	}
	if status != http.StatusOK || !clean || digest.FromBytes(body).String() != ld.String() {
		t.Fatalf("the blob after a wrong size: status %d, clean %v, %d bytes (want %d)", status, clean, len(body), ls)
	}
	assertStoreIntact(t, m.testMirror)
}

// A member names a manifest's media type beside a body its digest covers: the body's
// own word decides, so a member cannot store an index here as an image manifest.
func TestMemberMediaType(t *testing.T) {
	const (
		index    = "application/vnd.oci.image.index.v1+json"
		manifest = "application/vnd.oci.image.manifest.v1+json"
		docker   = "application/vnd.docker.distribution.manifest.v2+json"
	)
	for _, tc := range []struct {
		name, contentType, body, want string
	}{
		{"index labelled a manifest", manifest, `{"schemaVersion":2,"mediaType":"` + index + `","manifests":[]}`, index},
		{"manifest labelled an index", index, `{"schemaVersion":2,"mediaType":"` + docker + `","layers":[]}`, docker},
		{"index without mediaType, labelled a manifest", manifest, `{"schemaVersion":2,"manifests":[]}`, index},
		{"body says nothing: the member's word", docker, `{"schemaVersion":2,"layers":[]}`, docker},
		{"body says nothing, the word is no manifest type", "text/plain", `{"schemaVersion":2,"layers":[]}`, manifest},
	} {
		if got := memberMediaType(tc.contentType, []byte(tc.body)); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}
