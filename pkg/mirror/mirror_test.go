package mirror

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/testenv"
	"github.com/node-mirror/node-mirror/internal/wire"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// newUpstream is the shared test upstream (internal/testenv) with its blobs on disk: the
// soak test measures the heap, and must measure the mirror's, not the test upstream's
// growing store.
func newUpstream(t *testing.T) *testenv.Upstream {
	t.Helper()
	return testenv.NewUpstream(t, testenv.WithDiskBlobs())
}

type testMirror struct {
	*Mirror
	srv   *httptest.Server
	store *contentstore.Store
}

type mirrorOpt func(*Options)

func newMirror(t *testing.T, registries map[string][]string, opts ...mirrorOpt) *testMirror {
	t.Helper()
	return newMirrorAt(t, t.TempDir(), registries, opts...)
}

// Upstream client timings for tests. They leave room for a race build on a loaded
// 2-core machine, which runs ten times slower than a plain one: a stall timeout of half a
// second cut healthy downloads there. Tests of stalls use faultClient.
var (
	testClient = upstream.Options{
		BaseBackoff: 10 * time.Millisecond, StallTimeout: 15 * time.Second,
		HeaderTimeout: 15 * time.Second, MaxRetryAfter: 2 * time.Second,
	}
	// faultClient gives up on a stalled upstream within seconds, so tests that stall it
	// on purpose finish; its healthy transfers are small.
	faultClient = upstream.Options{
		BaseBackoff: 10 * time.Millisecond, StallTimeout: 2 * time.Second,
		HeaderTimeout: 2 * time.Second, MaxRetryAfter: 2 * time.Second,
	}
)

// newMirrorAt is newMirror on a given data dir.
func newMirrorAt(t *testing.T, dataDir string, registries map[string][]string, opts ...mirrorOpt) *testMirror {
	t.Helper()
	return newMirrorWith(t, dataDir, registries, testClient, opts...)
}

// newMirrorWith is newMirrorAt with the given upstream client options.
func newMirrorWith(t *testing.T, dataDir string, registries map[string][]string, uo upstream.Options, opts ...mirrorOpt) *testMirror {
	t.Helper()
	store, err := contentstore.Open(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	clients := map[string]*upstream.Client{}
	for name, eps := range registries {
		uo.Logger = nopLogger()
		c, err := upstream.New(name, eps, "", "", uo)
		if err != nil {
			t.Fatal(err)
		}
		clients[name] = c
	}
	o := Options{Store: store, Registries: clients, DefaultRegistry: "docker.io", Logger: nopLogger()}
	for _, f := range opts {
		f(&o)
	}
	m, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(m)
	t.Cleanup(func() {
		srv.Close()
		m.Close()
	})
	return &testMirror{Mirror: m, srv: srv, store: store}
}

func nopLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func (tm *testMirror) host() string { return strings.TrimPrefix(tm.srv.URL, "http://") }

// pull fetches and fully validates an image through the mirror (every blob's digest is
// checked by validate.Image).
func (tm *testMirror) pull(t *testing.T, ref string) v1.Image {
	t.Helper()
	r, err := name.ParseReference(tm.host()+"/"+ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r)
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	if err := validate.Image(img); err != nil {
		t.Fatalf("validate %s: %v", ref, err)
	}
	return img
}

func (tm *testMirror) get(t *testing.T, method, path string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, tm.srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp, b
}

func randomImage(t *testing.T, layerSize int64, layers int64) v1.Image {
	t.Helper()
	img, err := random.Image(layerSize, layers)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func TestColdThenWarmPull(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 64<<10, 3)
	up.Push("library/app", "v1", img)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})

	cold := tm.pull(t, "library/app:v1")
	coldGets := up.AnyBlobGETs()
	if coldGets != 4 { // three layers and the config, each once
		t.Fatalf("cold pull made %d upstream blob GETs, want 4", coldGets)
	}
	warm := tm.pull(t, "library/app:v1")
	if got := up.AnyBlobGETs(); got != coldGets {
		t.Fatalf("warm pull made %d more upstream blob GETs, want 0", got-coldGets)
	}
	cd, _ := cold.Digest()
	wd, _ := warm.Digest()
	want, _ := img.Digest()
	if cd != want || wd != want {
		t.Fatalf("digests cold %s warm %s, want %s", cd, wd, want)
	}
	// Every layer sits in the containerd store under its own name.
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		if _, err := tm.store.Size(digest.Digest(d.String())); err != nil {
			t.Errorf("layer %s not in store: %v", d, err)
		}
	}
}

func TestRoutingPrefixAndNamespace(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 1024, 1)
	up.Push("team/app", "v1", img)
	up.Push("library/nginx", "latest", img)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}, "ghcr.io": {up.URL()}})
	want, _ := img.Digest()

	for _, path := range []string{
		"/v2/team/app/manifests/v1?ns=ghcr.io", // containerd
		"/v2/ghcr.io/team/app/manifests/v1",    // containers/image path prefix
		"/v2/nginx/manifests/latest",           // Docker classic: default registry, library/
		"/v2/library/nginx/manifests/latest",   // already normalised
		"/v2/docker.io/nginx/manifests/latest", // path prefix + normalisation
		"/v2/nginx/manifests/latest?ns=docker.io",
	} {
		resp, _ := tm.get(t, http.MethodGet, path)
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Docker-Content-Digest") != want.String() {
			t.Errorf("%s: status %d digest %q, want 200 %s", path, resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), want)
		}
	}
}

func TestHeadManifestAndBlobHeaders(t *testing.T) {
	up := newUpstream(t)
	img, layer := up.PushOneLayer("library/app", "v1", 4096)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	raw, _ := img.Image.RawManifest()
	mt, want := img.MediaType, img.Digest
	ld, lsize := layer.Digest, len(layer.Bytes)

	for _, tc := range []struct {
		path, digest, ctype string
		size                int
	}{
		{"/v2/library/app/manifests/v1", want.String(), string(mt), len(raw)},
		{"/v2/library/app/manifests/" + want.String(), want.String(), string(mt), len(raw)},
		{layer.Path, ld.String(), blobContentType, lsize}, // cold HEAD
	} {
		for _, round := range []string{"cold", "warm"} {
			resp, body := tm.get(t, http.MethodHead, tc.path)
			if resp.StatusCode != 200 || len(body) != 0 ||
				resp.Header.Get("Docker-Content-Digest") != tc.digest ||
				resp.Header.Get("Content-Type") != tc.ctype ||
				resp.Header.Get("Content-Length") != fmt.Sprint(tc.size) {
				t.Errorf("%s HEAD %s: %d %v", round, tc.path, resp.StatusCode, resp.Header)
			}
		}
	}
}

func TestThunderingHerdFetchesOnce(t *testing.T) {
	up := newUpstream(t)
	_, layer := up.PushOneLayer("library/big", "v1", 8<<20)
	want, path := layer.Bytes, layer.Path

	// Slow the upstream body so every client arrives while the download is in flight.
	up.ServeSlowly(path, want, 512<<10, 20*time.Millisecond, false)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})

	const clients = 16
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(tm.srv.URL + path)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			got, err := io.ReadAll(resp.Body)
			if err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, want) {
				errs <- fmt.Errorf("client got %d bytes, not the blob", len(got))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := up.CountPath(http.MethodGet, path); n != 1 {
		t.Fatalf("%d clients caused %d upstream GETs, want 1", clients, n)
	}
}

func TestClientsStreamBeforeDownloadCompletes(t *testing.T) {
	up := newUpstream(t)
	_, layer := up.PushOneLayer("library/slow", "v1", 1<<20)
	want, path := layer.Bytes, layer.Path
	release := make(chan struct{})
	up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || r.URL.Path != path {
			return false
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(want)))
		w.WriteHeader(200)
		w.Write(want[:len(want)/2])
		w.(http.Flusher).Flush()
		<-release // the rest only after the client has seen the first half
		w.Write(want[len(want)/2:])
		return true
	})
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	resp, err := http.Get(tm.srv.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	half := make([]byte, len(want)/2)
	if _, err := io.ReadFull(resp.Body, half); err != nil {
		t.Fatalf("reading the first half while upstream holds the rest: %v", err)
	}
	close(release)
	rest, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(append(half, rest...), want) {
		t.Fatal("streamed bytes differ from the blob")
	}
}

func TestDownloadCompletesAfterClientLeaves(t *testing.T) {
	up := newUpstream(t)
	_, layer := up.PushOneLayer("library/app", "v1", 2<<20)
	d, want, path := layer.Digest, layer.Bytes, layer.Path
	up.ServeSlowly(path, want, 256<<10, 10*time.Millisecond, false)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, tm.srv.URL+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadFull(resp.Body, make([]byte, 1000))
	cancel() // the only client goes away mid-download
	resp.Body.Close()

	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := tm.store.Size(d); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("download was not committed after its client left")
		}
		time.Sleep(20 * time.Millisecond)
	}
	got, err := tm.store.ReadBlob(d)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("stored blob wrong: %v", err)
	}
}

func TestRangeOnCachedBlob(t *testing.T) {
	up := newUpstream(t)
	_, layer := up.PushOneLayer("library/app", "v1", 100<<10)
	want, path := layer.Bytes, layer.Path
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})

	for _, round := range []string{"cold", "warm"} {
		resp, body := tm.get(t, http.MethodGet, path, "Range", "bytes=1000-1999")
		if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, want[1000:2000]) {
			t.Fatalf("%s range: status %d, %d bytes", round, resp.StatusCode, len(body))
		}
		if cr := resp.Header.Get("Content-Range"); cr != fmt.Sprintf("bytes 1000-1999/%d", len(want)) {
			t.Fatalf("%s Content-Range %q", round, cr)
		}
	}
	if n := up.AnyBlobGETs(); n != 1 {
		t.Fatalf("upstream blob GETs %d, want 1", n)
	}
}

// TestBadUpstreamBytesNeverServedComplete covers a flipped byte and a short body: the
// client must not receive a complete response, nothing is committed, and a later request
// to a healthy upstream succeeds.
func TestBadUpstreamBytesNeverServedComplete(t *testing.T) {
	for _, tc := range []struct {
		name  string
		serve func(w http.ResponseWriter, blob []byte)
	}{
		{"flipped byte", func(w http.ResponseWriter, blob []byte) {
			bad := bytes.Clone(blob)
			bad[len(bad)/2] ^= 0xff
			w.Header().Set("Content-Length", fmt.Sprint(len(bad)))
			w.Write(bad)
		}},
		{"flipped last byte", func(w http.ResponseWriter, blob []byte) {
			bad := bytes.Clone(blob)
			bad[len(bad)-1] ^= 0xff
			w.Header().Set("Content-Length", fmt.Sprint(len(bad)))
			w.Write(bad)
		}},
		{"truncated", func(w http.ResponseWriter, blob []byte) {
			w.Header().Set("Content-Length", fmt.Sprint(len(blob)))
			w.Write(blob[:len(blob)/2])
			panic(http.ErrAbortHandler)
		}},
		{"chunked truncated", func(w http.ResponseWriter, blob []byte) {
			w.Write(blob[:len(blob)-10])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}},
		{"wrong blob", func(w http.ResponseWriter, blob []byte) {
			other := make([]byte, len(blob))
			rand.Read(other)
			w.Header().Set("Content-Length", fmt.Sprint(len(other)))
			w.Write(other)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t)
			_, layer := up.PushOneLayer("library/app", "v1", 256<<10)
			ld, blob, path := layer.Digest, layer.Bytes, layer.Path
			var faulty atomic.Bool
			faulty.Store(true)
			up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
				if !faulty.Load() || r.Method != http.MethodGet || r.URL.Path != path {
					return false
				}
				tc.serve(w, blob)
				return true
			})
			tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})

			resp, err := http.Get(tm.srv.URL + path)
			if err == nil {
				got, rerr := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK && rerr == nil {
					t.Fatalf("client got a complete 200 (%d bytes, equal to blob: %v)", len(got), bytes.Equal(got, blob))
				}
			}
			waitNoDownloads(t, tm)
			if _, err := tm.store.Size(ld); err == nil {
				t.Fatal("bad bytes were committed")
			}
			if ds, _ := tm.store.Digests(context.Background()); len(ds) != 0 {
				t.Fatalf("store holds %v after a failed download", ds)
			}

			faulty.Store(false)
			resp2, body := tm.get(t, http.MethodGet, path)
			if resp2.StatusCode != 200 || !bytes.Equal(body, blob) {
				t.Fatalf("healthy retry: status %d, equal %v", resp2.StatusCode, bytes.Equal(body, blob))
			}
		})
	}
}

func waitNoDownloads(t *testing.T, tm *testMirror) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		tm.mu.Lock()
		n := len(tm.downloads)
		tm.mu.Unlock()
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("downloads did not finish")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestTagsResolveWithUpstreamStopped(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 1024, 2)
	up.Push("library/app", "v1", img)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.TagFreshness = 0 })
	tm.pull(t, "library/app:v1")
	up.Stop()

	// The pull revalidates the tag (freshness 0), upstream refuses connections, and the
	// cached answer is served.
	got := tm.pull(t, "library/app:v1")
	gd, _ := got.Digest()
	want, _ := img.Digest()
	if gd != want {
		t.Fatalf("stale tag resolved to %s, want %s", gd, want)
	}
}

func TestTagServedStaleOnUpstreamErrors(t *testing.T) {
	for _, status := range []int{500, 503, 429, 401} {
		t.Run(fmt.Sprint(status), func(t *testing.T) {
			up := newUpstream(t)
			img := randomImage(t, 1024, 1)
			up.Push("library/app", "v1", img)
			tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.TagFreshness = 0 })
			tm.pull(t, "library/app:v1")
			up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
				if status == 401 {
					// An auth challenge whose token server is down.
					w.Header().Set("WWW-Authenticate", `Bearer realm="http://127.0.0.1:1/token",service="x"`)
				}
				w.Header().Set("Retry-After", "1")
				w.WriteHeader(status)
				return true
			})
			resp, _ := tm.get(t, http.MethodGet, "/v2/library/app/manifests/v1")
			want, _ := img.Digest()
			if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != want.String() {
				t.Fatalf("status %d digest %q, want cached 200", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
			}
		})
	}
}

func TestTagChangesAndDeletionsAreSeen(t *testing.T) {
	up := newUpstream(t)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.TagFreshness = 0 })
	img1 := randomImage(t, 1024, 1)
	img2 := randomImage(t, 1024, 1)
	up.Push("library/app", "v1", img1)
	d1, _ := img1.Digest()
	d2, _ := img2.Digest()
	if resp, _ := tm.get(t, http.MethodGet, "/v2/library/app/manifests/v1"); resp.Header.Get("Docker-Content-Digest") != d1.String() {
		t.Fatal("first digest wrong")
	}
	up.Push("library/app", "v1", img2)
	if resp, _ := tm.get(t, http.MethodGet, "/v2/library/app/manifests/v1"); resp.Header.Get("Docker-Content-Digest") != d2.String() {
		t.Fatalf("moved tag still resolves to %s", resp.Header.Get("Docker-Content-Digest"))
	}
	// A tag upstream does not know is a 404, not a stale answer.
	resp, body := tm.get(t, http.MethodGet, "/v2/library/app/manifests/nope")
	if resp.StatusCode != 404 || !strings.Contains(string(body), "MANIFEST_UNKNOWN") {
		t.Fatalf("unknown tag: %d %s", resp.StatusCode, body)
	}
}

func TestTagRevalidationCoalesced(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 1024, 1)
	up.Push("library/app", "v1", img)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.TagFreshness = 0 })
	tm.get(t, http.MethodGet, "/v2/library/app/manifests/v1")
	before := up.CountPath(http.MethodHead, "/v2/library/app/manifests/v1")
	gate := make(chan struct{})
	up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodHead {
			<-gate // hold the HEAD so the clients pile up behind it
		}
		return false
	})
	var joined atomic.Int32
	tm.tagWaitHook = func() { joined.Add(1) }
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(tm.srv.URL + "/v2/library/app/manifests/v1")
			if err == nil {
				resp.Body.Close()
			}
		}()
	}
	// Open the gate only once every client has joined the one revalidation in flight.
	for deadline := time.Now().Add(30 * time.Second); joined.Load() < 16; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			close(gate)
			t.Fatalf("only %d of 16 clients joined the revalidation", joined.Load())
		}
	}
	close(gate)
	wg.Wait()
	if n := up.CountPath(http.MethodHead, "/v2/library/app/manifests/v1") - before; n != 1 {
		t.Fatalf("16 concurrent tag requests caused %d upstream HEADs, want 1", n)
	}
}

func TestManifestLimitsAndVerification(t *testing.T) {
	up := newUpstream(t)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	big := bytes.Repeat([]byte("x"), 4<<20+1)
	good := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}`)
	goodDigest := digest.FromBytes(good)
	lying := digest.FromString("something else")
	up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		switch r.URL.Path {
		case "/v2/library/big/manifests/v1":
			w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
			w.Write(big)
		case "/v2/library/liar/manifests/" + lying.String():
			w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
			w.Write(good)
		default:
			return false
		}
		return true
	})
	resp, body := tm.get(t, http.MethodGet, "/v2/library/big/manifests/v1")
	if resp.StatusCode < 400 || !strings.Contains(string(body), "MANIFEST_INVALID") {
		t.Errorf("oversized manifest: %d %s", resp.StatusCode, body)
	}
	resp, body = tm.get(t, http.MethodGet, "/v2/library/liar/manifests/"+lying.String())
	if resp.StatusCode < 400 || !strings.Contains(string(body), "DIGEST_INVALID") {
		t.Errorf("manifest not matching its digest: %d %s", resp.StatusCode, body)
	}
	for _, d := range []digest.Digest{lying, goodDigest} {
		if _, err := tm.store.Size(d); err == nil {
			t.Errorf("%s was stored", d)
		}
	}
}

func TestEndpointsTriedInOrder(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 1024, 1)
	up.Push("library/app", "v1", img)
	var mu sync.Mutex
	var asked []string // which endpoint each upstream request reached, in order
	record := func(who string) {
		mu.Lock()
		asked = append(asked, who)
		mu.Unlock()
	}
	corp := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		record("corp")
		w.WriteHeader(http.StatusNotFound) // a corporate mirror without the image
	}))
	defer corp.Close()
	up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		record("registry")
		return false
	})
	const manifest = "/v2/library/app/manifests/v1"
	for _, tc := range []struct {
		name      string
		endpoints []string
		want      []string // each upstream request (the mirror may make several) asks these in turn
	}{
		{"corporate mirror first", []string{corp.URL, up.URL()}, []string{"corp", "registry"}},
		{"registry first", []string{up.URL(), corp.URL}, []string{"registry"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mu.Lock()
			asked = nil
			mu.Unlock()
			tm := newMirror(t, map[string][]string{"docker.io": tc.endpoints})
			if resp, body := tm.get(t, http.MethodGet, manifest); resp.StatusCode != 200 {
				t.Fatalf("GET %s: %d %s", manifest, resp.StatusCode, body)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(asked) == 0 || len(asked)%len(tc.want) != 0 {
				t.Fatalf("endpoints asked %v, want repetitions of %v", asked, tc.want)
			}
			for i, who := range asked {
				if who != tc.want[i%len(tc.want)] {
					t.Fatalf("endpoints asked %v, want repetitions of %v", asked, tc.want)
				}
			}
		})
	}
	// A dead first endpoint is tried first, then passed over.
	var seq, deadFirst, upFirst atomic.Int64
	dead := hangUp(t, func() { deadFirst.CompareAndSwap(0, seq.Add(1)) })
	up.SetHook(func(http.ResponseWriter, *http.Request) bool {
		upFirst.CompareAndSwap(0, seq.Add(1))
		return false
	})
	tm := newMirror(t, map[string][]string{"docker.io": {"http://" + dead, up.URL()}})
	tm.pull(t, "library/app:v1")
	if d, u := deadFirst.Load(), upFirst.Load(); d == 0 || u == 0 || d > u {
		t.Fatalf("first contact: dead endpoint #%d, working endpoint #%d; want the dead one, listed first, tried first", d, u)
	}
}

func TestTagsListAndReferrersPassThrough(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 1024, 1)
	up.Push("library/app", "v1", img)
	up.Push("library/app", "v2", img)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	resp, body := tm.get(t, http.MethodGet, "/v2/library/app/tags/list")
	var tl struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(body, &tl) != nil || len(tl.Tags) != 2 {
		t.Fatalf("tags/list: %d %s", resp.StatusCode, body)
	}
	// Cached for ListTTL: with upstream gone the answer is still there.
	up.Stop()
	resp, body2 := tm.get(t, http.MethodGet, "/v2/library/app/tags/list")
	if resp.StatusCode != 200 || !bytes.Equal(body, body2) {
		t.Fatalf("cached tags/list: %d %s", resp.StatusCode, body2)
	}
}

func TestReferrersPassThrough(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 1024, 1)
	up.Push("library/app", "v1", img)
	d, _ := img.Digest()
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	resp, body := tm.get(t, http.MethodGet, "/v2/library/app/referrers/"+d.String())
	var idx struct {
		MediaType string            `json:"mediaType"`
		Manifests []json.RawMessage `json:"manifests"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(body, &idx) != nil || idx.MediaType != "application/vnd.oci.image.index.v1+json" {
		t.Fatalf("referrers: %d %s", resp.StatusCode, body)
	}
}

func TestBadRequests(t *testing.T) {
	// A listener that counts connections proves an unconfigured ns is never contacted.
	var accepted atomic.Int32
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	up := newUpstream(t)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	d := digest.FromString("x").String()

	for _, tc := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", "/v2/UPPER/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/a..b/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/library/../etc/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/library/%2e%2e/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/library%2Fapp/manifests/v1", 400, "NAME_INVALID"},
		{"GET", "/v2/library/app/blobs/sha256%2F..%2F..", 400, "NAME_INVALID"},
		{"GET", "/v2//app/manifests/v1", 400, "NAME_INVALID"},
		// A pull of a reference that cannot exist: manifest unknown (issue 11.7).
		{"GET", "/v2/app/manifests/-bad", 404, "MANIFEST_UNKNOWN"},
		{"GET", "/v2/app/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"},
		{"HEAD", "/v2/app/manifests/.INVALID_MANIFEST_NAME", 404, ""},
		{"GET", "/v2/app/manifests/sha256:abc", 400, "DIGEST_INVALID"},
		{"GET", "/v2/app/blobs/sha256:zz", 400, "DIGEST_INVALID"},
		{"GET", "/v2/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"},
		{"GET", "/v2/app/blobs/latest", 400, "DIGEST_INVALID"},
		{"GET", "/v2/app/blobs/" + strings.Replace(d, "sha256", "sha1", 1), 400, "DIGEST_INVALID"},
		{"GET", "/v2/app/manifests/v1?ns=" + ln.Addr().String(), 404, "NAME_UNKNOWN"},
		{"GET", "/v2/app/manifests/v1?ns=169.254.169.254", 404, "NAME_UNKNOWN"},
		{"GET", "/v2/app/blobs/" + d + "?ns=[::1]:80", 404, "NAME_UNKNOWN"},
		{"GET", "/v2/app/blobs/" + d + "?ns=localhost", 404, "NAME_UNKNOWN"},
		{"PUT", "/v2/app/manifests/v1", 405, "UNSUPPORTED"},
		{"DELETE", "/v2/app/blobs/" + d, 405, "UNSUPPORTED"},
		{"POST", "/v2/app/blobs/uploads/", 405, "UNSUPPORTED"},
		{"PATCH", "/v2/app/blobs/uploads/123", 405, "UNSUPPORTED"},
		{"GET", "/v2/app/blobs/uploads/123", 405, "UNSUPPORTED"},
		{"GET", "/v2/app/other/thing", 404, "NOT_FOUND"},
		{"GET", "/v2/app/tags/notlist", 404, "NOT_FOUND"},
		{"GET", "/v2/app/manifests/missing", 404, "MANIFEST_UNKNOWN"},
		{"GET", "/v2/app/blobs/" + d, 404, "BLOB_UNKNOWN"},
	} {
		resp, body := tm.get(t, tc.method, tc.path)
		if tc.method == http.MethodHead {
			if resp.StatusCode != tc.status || len(body) != 0 {
				t.Errorf("%s %s: got %d with %d body bytes, want %d and none", tc.method, tc.path, resp.StatusCode, len(body), tc.status)
			}
			continue
		}
		var env wire.Envelope
		if resp.StatusCode != tc.status || json.Unmarshal(body, &env) != nil || len(env.Errors) != 1 || env.Errors[0].Code != tc.code {
			t.Errorf("%s %s: got %d %s, want %d %s", tc.method, tc.path, resp.StatusCode, body, tc.status, tc.code)
		}
	}
	if n := accepted.Load(); n != 0 {
		t.Fatalf("the mirror connected %d times to an unconfigured host", n)
	}
}

func TestBaseEndpoint(t *testing.T) {
	up := newUpstream(t)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	resp, body := tm.get(t, http.MethodGet, "/v2/")
	if resp.StatusCode != 200 || string(body) != "{}" || resp.Header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
		t.Fatalf("/v2/: %d %q", resp.StatusCode, body)
	}
}

// hangUp is an endpoint that is down: it accepts and closes every connection, calling
// accepted for each. The test holds it open, so no other process can take its port.
func hangUp(t *testing.T, accepted func()) string {
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
			accepted()
			c.Close()
		}
	}()
	return ln.Addr().String()
}
