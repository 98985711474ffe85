package mirror

import (
	"net/http"
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

	off := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.EagerFetch = 0 })
	before := up.AnyBlobGETs()
	off.get(t, http.MethodGet, "/v2/library/multi/manifests/"+ad.String())
	time.Sleep(200 * time.Millisecond)
	if n := up.AnyBlobGETs(); n != before {
		t.Fatalf("eager fetching off, yet %d blobs fetched", n-before)
	}
}
