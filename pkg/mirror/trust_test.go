package mirror

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/pkg/contentstore"
)

// getRange GETs url with a Range header and reports status, body and a clean end.
func getRange(t *testing.T, url, rng string) (status int, body []byte, clean bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, false
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	return resp.StatusCode, body, err == nil
}

// flipped returns b with one byte inverted at i.
func flipped(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0xff
	return c
}

// TestManifestByDigestOfALayer (issue 10.1): a cached layer asked for under manifests/
// is not a manifest. It used to be read whole into memory and answered 200 with a
// manifest content type.
func TestManifestByDigestOfALayer(t *testing.T) {
	up := newUpstream(t)
	img, layer := up.PushOneLayer("library/app", "v1", 1<<20)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	tm.pull(t, "library/app:v1")
	ld := layer.Digest
	if _, err := tm.store.Size(ld); err != nil {
		t.Fatalf("layer not cached: %v", err)
	}
	for _, method := range []string{http.MethodGet, http.MethodHead} {
		resp, body := tm.get(t, method, "/v2/library/app/manifests/"+ld.String())
		if resp.StatusCode != http.StatusNotFound || (method == http.MethodGet && !strings.Contains(string(body), "MANIFEST_UNKNOWN")) {
			t.Errorf("%s manifests/<layer digest>: %d %.100s, want 404 MANIFEST_UNKNOWN", method, resp.StatusCode, body)
		}
	}
	// The image's own manifest is still served from cache.
	if resp, _ := tm.get(t, http.MethodGet, "/v2/library/app/manifests/"+img.Digest.String()); resp.StatusCode != http.StatusOK {
		t.Fatalf("manifest by digest: %d", resp.StatusCode)
	}
}

// TestStoredManifestOverLimitNotRead: a manifest stored under a larger limit (the limit
// was lowered by a reload) is not read into memory; it is fetched again and refused.
func TestStoredManifestOverLimitNotRead(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 1024, 1)
	up.Push("library/app", "v1", img)
	raw, _ := img.RawManifest()
	md, _ := img.Digest()
	dir := t.TempDir()
	tm := newMirrorAt(t, dir, map[string][]string{"docker.io": {up.URL()}})
	if resp, _ := tm.get(t, http.MethodGet, "/v2/library/app/manifests/"+md.String()); resp.StatusCode != http.StatusOK {
		t.Fatalf("manifest: %d", resp.StatusCode)
	}
	o := tm.opts
	o.MaxManifestSize = int64(len(raw)) - 1
	if err := tm.Reconfigure(o); err != nil {
		t.Fatal(err)
	}
	resp, _ := tm.get(t, http.MethodGet, "/v2/library/app/manifests/"+md.String())
	if resp.StatusCode == http.StatusOK {
		t.Fatal("a stored manifest over the limit was served")
	}
}

// TestListCacheBounded (issue 10.2): list answers are kept within a byte budget, and a
// client cannot make distinct entries of one answer by spelling its query differently.
func TestListCacheBounded(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 1024, 1)
	up.Push("library/app", "v1", img)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	for _, q := range []string{"?n=5", "?n=05", "?n=5&junk=1", "?last=&n=5"} {
		if resp, body := tm.get(t, http.MethodGet, "/v2/library/app/tags/list"+q); resp.StatusCode != 200 {
			t.Fatalf("tags/list%s: %d %s", q, resp.StatusCode, body)
		}
	}
	if n := up.CountPath(http.MethodGet, "/v2/library/app/tags/list"); n != 1 {
		t.Fatalf("one list under four spellings took %d upstream requests, want 1", n)
	}

	var c listCache
	big := &listAnswer{body: make([]byte, 3<<20), fetched: time.Now()}
	for i := range 100 {
		a := *big
		a.fetched = big.fetched.Add(time.Duration(i))
		c.put(fmt.Sprint(i), &a)
		if c.bytes > listBudget {
			t.Fatalf("after %d answers the list cache holds %d bytes, budget %d", i+1, c.bytes, listBudget)
		}
	}
	if c.get("99") == nil || c.get("0") != nil {
		t.Fatal("the list cache did not keep the newest answer and drop the oldest")
	}
	small := &listAnswer{body: []byte("{}"), fetched: time.Now()}
	for i := range 5000 {
		c.put(fmt.Sprint("s", i), small)
	}
	if len(c.entries) > maxLists {
		t.Fatalf("%d list answers kept, want at most %d", len(c.entries), maxLists)
	}
}

// TestCheckedTagsBounded (issue 10.3): revalidation times for tags clients name do not
// grow without bound.
func TestCheckedTagsBounded(t *testing.T) {
	up := newUpstream(t)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	for i := range 3 * maxChecked {
		tm.markChecked(fmt.Sprint("docker.io/library/app:", i), time.Hour)
	}
	tm.mu.Lock()
	n := len(tm.checked)
	tm.mu.Unlock()
	if n > maxChecked {
		t.Fatalf("%d tag revalidations kept, want at most %d", n, maxChecked)
	}
}

// TestRangeOnAMissIsVerified (issue 10.9): a Range request for a blob being downloaded
// from a corrupting upstream never gets a clean response of wrong bytes; from an honest
// upstream it gets its bytes while the download runs.
func TestRangeOnAMissIsVerified(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt bool
		rng     string
	}{
		{"corrupt head", true, "bytes=0-99"},
		{"corrupt middle", true, "bytes=1000-1999"},
		{"corrupt suffix", true, "bytes=-100"},
		{"honest head", false, "bytes=0-99"},
		{"honest tail", false, "bytes=4000-"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t)
			blob := bytes.Repeat([]byte("node-mirror "), 1<<14)
			d := digest.FromBytes(blob)
			path := "/v2/library/app/blobs/" + d.String()
			sent := blob
			if tc.corrupt {
				sent = flipped(blob, 10)
				sent = flipped(sent, 1500)
				sent = flipped(sent, len(sent)-50)
			}
			up.ServeSlowly(path, sent, 16<<10, 5*time.Millisecond, false)
			tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
			status, body, clean := getRange(t, tm.srv.URL+path, tc.rng)
			want, _ := requestedWindow(&http.Request{Header: http.Header{"Range": {tc.rng}}}, int64(len(blob)), "")
			if tc.corrupt {
				if clean && status/100 == 2 {
					t.Fatalf("corrupt upstream: %s answered %d with %d clean bytes", tc.rng, status, len(body))
				}
			} else if status != http.StatusPartialContent || !clean || !bytes.Equal(body, blob[want.start:want.end]) {
				t.Fatalf("honest upstream: %s answered %d clean %v, %d bytes (right: %v)", tc.rng, status, clean, len(body), bytes.Equal(body, blob[want.start:want.end]))
			}
			assertStoreIntact(t, tm)
		})
	}
}

// TestPassThroughNeverUnverified (issue 10.11): with nothing storable, an upstream that
// answers 206 to a request for the whole blob is refused, and a client's Range is served
// from the verified whole.
func TestPassThroughNeverUnverified(t *testing.T) {
	blob := bytes.Repeat([]byte("pass-through "), 1<<13)
	d := digest.FromBytes(blob)
	path := "/v2/library/app/blobs/" + d.String()
	for _, tc := range []struct {
		name     string
		answer   func(w http.ResponseWriter, r *http.Request)
		rng      string
		wantBody []byte // nil: the response must not be a clean 2xx
	}{
		{"206 to a whole request", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-99/%d", len(blob)))
			w.Header().Set("Content-Length", "100")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(blob[:100])
		}, "", nil},
		{"corrupt body, client range", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", fmt.Sprint(len(blob)))
			w.Write(flipped(blob, len(blob)-1))
		}, "bytes=0-99", nil},
		{"honest body, client range", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", fmt.Sprint(len(blob)))
			w.Write(blob)
		}, "bytes=100-199", blob[100:200]},
		{"empty body", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "0")
		}, "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t)
			up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
				if r.URL.Path != path || r.Method != http.MethodGet {
					return false
				}
				tc.answer(w, r)
				return true
			})
			tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
			tm.store.SetBudget(contentstore.Budget{MaxBytes: 1}) // nothing fits: pass-through
			status, body, clean := getRange(t, tm.srv.URL+path, tc.rng)
			if tc.wantBody == nil {
				if clean && status/100 == 2 {
					t.Fatalf("answered %d with %d clean bytes", status, len(body))
				}
			} else if status != http.StatusPartialContent || !clean || !bytes.Equal(body, tc.wantBody) {
				t.Fatalf("answered %d clean %v with %d bytes (right: %v)", status, clean, len(body), bytes.Equal(body, tc.wantBody))
			}
			if tm.Stats().PassThrough == 0 && len(tc.wantBody) > 0 {
				t.Fatal("not a pass-through; the test proves nothing")
			}
			assertStoreIntact(t, tm)
		})
	}
}

// TestUnknownLengthStopsAtTheBudget (issue 10.12): a chunked upstream body no longer grows
// its ingest past the budget; the download stops there and the client gets the blob by
// pass-through, verified.
func TestUnknownLengthStopsAtTheBudget(t *testing.T) {
	blob := make([]byte, 24<<20)
	for i := range blob {
		blob[i] = byte(i * 7 / 5)
	}
	d := digest.FromBytes(blob)
	path := "/v2/library/app/blobs/" + d.String()
	up := newUpstream(t)
	gets := up.ServeSlowly(path, blob, 256<<10, time.Millisecond, true)
	const budget = 8 << 20
	dir := t.TempDir()
	tm := newMirrorAt(t, dir, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.EagerFetch = 0 })
	tm.store.SetBudget(contentstore.Budget{MaxBytes: budget})

	var peak atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			peak.Store(max(peak.Load(), dirBytes(filepath.Join(dir, "content"))))
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	status, body, clean := fetch(t, tm.srv.URL+path)
	close(stop)
	wg.Wait()
	if status != http.StatusOK || !clean || !bytes.Equal(body, blob) {
		t.Fatalf("status %d clean %v, %d bytes (right: %v)", status, clean, len(body), bytes.Equal(body, blob))
	}
	if p := peak.Load(); p > budget+unknownLengthStep {
		t.Fatalf("the content store reached %d bytes under a %d-byte budget", p, budget)
	}
	if _, err := tm.store.Size(d); err == nil {
		t.Fatal("a blob over the budget was stored")
	}
	if tm.Stats().PassThrough == 0 || gets.Load() != 2 {
		t.Fatalf("pass-throughs %d, upstream GETs %d: want the download stopped and the blob passed through", tm.Stats().PassThrough, gets.Load())
	}
	assertStoreIntact(t, tm)
}

// dirBytes sums the sizes of the files under dir.
func dirBytes(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// TestTagsListPaginationKeepsTheRegistry (issue 11.3): the Link a client follows for the
// next page names the registry the way the client did (ns parameter or path prefix), so
// page two comes from the same registry, not from the default one.
func TestTagsListPaginationKeepsTheRegistry(t *testing.T) {
	other := newUpstream(t) // docker.io, which has no team/app
	ghcr := newUpstream(t)
	ghcr.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v2/team/app/tags/list" {
			return false
		}
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Query().Get("last") == "" {
			w.Header().Set("Link", `<`+ghcr.URL()+`/v2/team/app/tags/list?last=a&n=1>; rel="next"`)
			fmt.Fprint(w, `{"name":"team/app","tags":["a"]}`)
			return true
		}
		fmt.Fprint(w, `{"name":"team/app","tags":["b"]}`)
		return true
	})
	tm := newMirror(t, map[string][]string{"docker.io": {other.URL()}, "ghcr.io": {ghcr.URL()}})
	for _, first := range []string{"/v2/team/app/tags/list?n=1&ns=ghcr.io", "/v2/ghcr.io/team/app/tags/list?n=1"} {
		resp, body := tm.get(t, http.MethodGet, first)
		if resp.StatusCode != 200 || !strings.Contains(string(body), `"a"`) {
			t.Fatalf("%s: %d %s", first, resp.StatusCode, body)
		}
		link := resp.Header.Get("Link")
		next, _, ok := strings.Cut(strings.TrimPrefix(link, "<"), ">")
		if !ok || !strings.HasPrefix(next, "/v2/") {
			t.Fatalf("%s: Link %q", first, link)
		}
		resp, body = tm.get(t, http.MethodGet, next)
		if resp.StatusCode != 200 || !strings.Contains(string(body), `"b"`) {
			t.Fatalf("%s: following Link %s gave %d %s, want page two from ghcr.io", first, next, resp.StatusCode, body)
		}
	}
	// A Link naming another endpoint than the list asked for is not handed to clients.
	ghcr.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v2/team/app/tags/list" {
			return false
		}
		w.Header().Set("Link", `<http://169.254.169.254/latest/meta-data>; rel="next"`)
		fmt.Fprint(w, `{"name":"team/app","tags":["c"]}`)
		return true
	})
	resp, _ := tm.get(t, http.MethodGet, "/v2/ghcr.io/team/app/tags/list?n=2")
	if resp.StatusCode != 200 || resp.Header.Get("Link") != "" {
		t.Fatalf("foreign Link passed on: %d %q", resp.StatusCode, resp.Header.Get("Link"))
	}
}

// TestCountersAgree (issue 11.4): each request is counted once, with its real result: a
// list answer counts, a blob of unknown length fetched from upstream is one miss and no
// cache bytes, and a manifest fetched from upstream is no hit in the index.
func TestCountersAgree(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 1024, 1)
	up.Push("library/app", "v1", img)
	blob := bytes.Repeat([]byte("chunked "), 4096)
	d := digest.FromBytes(blob)
	path := "/v2/library/app/blobs/" + d.String()
	up.ServeSlowly(path, blob, 4096, 0, true)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.EagerFetch = 0 })

	if resp, _ := tm.get(t, http.MethodGet, "/v2/library/app/tags/list"); resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
	if s := tm.Stats(); s.Misses != 1 || s.Hits != 0 {
		t.Fatalf("after one tags/list from upstream: %+v, want one miss", s)
	}
	if status, body, clean := fetch(t, tm.srv.URL+path); status != 200 || !clean || !bytes.Equal(body, blob) {
		t.Fatalf("chunked blob: %d %v", status, clean)
	}
	if s := tm.Stats(); s.Misses != 2 || s.Hits != 0 || s.BytesSaved != 0 {
		t.Fatalf("after a chunked blob from upstream: %+v, want two misses, no hits, no bytes saved", s)
	}
	md, _ := img.Digest()
	if resp, _ := tm.get(t, http.MethodGet, "/v2/library/app/manifests/"+md.String()); resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
	if err := tm.store.FlushAccess(); err != nil {
		t.Fatal(err)
	}
	if meta, _, _ := tm.store.BlobMeta(digest.Digest(md.String())); meta.Hits != 0 {
		t.Fatalf("a manifest fetched from upstream counted %d index hits", meta.Hits)
	}
	if resp, _ := tm.get(t, http.MethodGet, "/v2/library/app/manifests/"+md.String()); resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
	tm.store.FlushAccess()
	if meta, _, _ := tm.store.BlobMeta(digest.Digest(md.String())); meta.Hits != 1 {
		t.Fatalf("a manifest served from the store counted %d index hits, want 1", meta.Hits)
	}
	if s := tm.Stats(); s.Misses != 3 || s.Hits != 1 {
		t.Fatalf("final counters %+v, want 3 misses and 1 hit", s)
	}
}
