package mirror

import (
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/opencontainers/go-digest"
)

func layerDigests(t *testing.T, img v1.Image) []digest.Digest {
	t.Helper()
	ls, _ := img.Layers()
	var out []digest.Digest
	for _, l := range ls {
		d, _ := l.Digest()
		out = append(out, digest.Digest(d.String()))
	}
	cd, _ := img.ConfigName()
	return append(out, digest.Digest(cd.String()))
}

func waitStored(t *testing.T, tm *testMirror, ds []digest.Digest) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, d := range ds {
		for {
			if _, err := tm.store.Size(d); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s was not fetched eagerly", d)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// TestEagerLayerFetch: fetching an index's tag starts background fetches of this node's
// image and its layers (not the other platform's), each once; the engine's own requests
// later are served without more upstream fetches. Turned off, nothing is fetched ahead.
func TestEagerLayerFetch(t *testing.T) {
	up := newUpstream(t)
	amd := randomImage(t, 32<<10, 3)
	arm := randomImage(t, 32<<10, 3)
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
	)
	up.PushIndex("library/multi", "v1", idx)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.Platform, o.EagerFetch = "linux/amd64", 4 })

	if resp, _ := tm.get(t, http.MethodGet, "/v2/library/multi/manifests/v1"); resp.StatusCode != 200 {
		t.Fatalf("index: %d", resp.StatusCode)
	}
	want := layerDigests(t, amd)
	waitStored(t, tm, want)
	waitNoDownloads(t, tm)
	for _, d := range layerDigests(t, arm) {
		if _, err := tm.store.Size(d); err == nil || up.CountPath(http.MethodGet, "/v2/library/multi/blobs/"+d.String()) != 0 {
			t.Fatalf("the other platform's blob %s was fetched", d)
		}
	}
	gets := up.AnyBlobGETs()
	if gets != len(want) {
		t.Fatalf("%d upstream blob GETs for %d blobs", gets, len(want))
	}
	ad, _ := amd.Digest()
	tm.pull(t, "library/multi@"+ad.String())
	if n := up.AnyBlobGETs(); n != gets {
		t.Fatalf("the pull after eager fetching made %d more blob GETs", n-gets)
	}

	// Turned off, the image manifest's request starts nothing. Proven without waiting:
	// eagerFrom runs inside ServeHTTP, so when ServeHTTP has returned, whatever it started
	// is a queued job or a download in flight; and with no worker running, a queued job
	// stays queued. The positive control makes the same request with eager fetching on,
	// and it does fetch the image's blobs.
	manifest := "/v2/library/multi/manifests/" + ad.String()
	on := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.EagerFetch = 4 })
	serveDirect(t, on, manifest)
	waitStored(t, on, want)
	waitNoDownloads(t, on)

	off := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.EagerFetch = 0 })
	before := up.AnyBlobGETs()
	serveDirect(t, off, manifest)
	off.eagerMu.Lock()
	workers := len(off.eagerStops)
	off.eagerMu.Unlock()
	if workers != 0 || off.eagerOn.Load() {
		t.Fatalf("eager fetching off, yet %d workers run (on: %v)", workers, off.eagerOn.Load())
	}
	if n := len(off.eager); n != 0 {
		t.Fatalf("eager fetching off, yet the manifest request queued %d jobs", n)
	}
	if n := off.Stats().Downloads; n != 0 {
		t.Fatalf("eager fetching off, yet the manifest request started %d downloads", n)
	}
	if n := up.AnyBlobGETs(); n != before {
		t.Fatalf("eager fetching off, yet %d blobs fetched", n-before)
	}
	for _, d := range want {
		if _, err := off.store.Size(d); err == nil {
			t.Fatalf("eager fetching off, yet %s is stored", d)
		}
	}
}

// serveDirect GETs path from the mirror's handler itself, not over a connection, so that
// when it returns, the handler has returned too.
func serveDirect(t *testing.T, tm *testMirror, path string) {
	t.Helper()
	rec := httptest.NewRecorder()
	tm.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, rec.Code, rec.Body)
	}
}
