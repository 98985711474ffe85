package mirror

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/fault"
	"github.com/node-mirror/node-mirror/internal/testenv"
)

// fetch GETs path and reports the status, the body read, and whether the body ended
// cleanly. A transport error counts as an unclean end.
func fetch(t *testing.T, url string) (status int, body []byte, clean bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, false
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	return resp.StatusCode, body, err == nil
}

// assertStoreIntact checks the invariant the whole design rests on: every file in
// blobs/ hashes to its name, and no ingest is left once downloads are over.
func assertStoreIntact(t *testing.T, tm *testMirror) {
	t.Helper()
	waitNoDownloads(t, tm)
	testenv.StoredBlobs(t, tm.store.Path())
	if sts, _ := tm.store.Content().ListStatuses(context.Background()); len(sts) != 0 {
		t.Fatalf("ingests left behind: %v", sts)
	}
}

// TestBlobFaults: for each way an upstream can misbehave on a blob, the client gets the
// right bytes or an error (never a complete response of wrong bytes), nothing wrong is
// committed, and a healthy upstream afterwards serves the blob.
func TestBlobFaults(t *testing.T) {
	for _, tc := range []struct {
		rule      fault.Rule
		token     bool // upstream demands a bearer token
		mayServe  bool // the fault does not corrupt (slow, or retried away)
		mustServe bool
	}{
		{rule: fault.Rule{Kind: fault.FlipByte}},
		{rule: fault.Rule{Kind: fault.Truncate}},
		{rule: fault.Rule{Kind: fault.WrongLength}},
		{rule: fault.Rule{Kind: fault.StallAfterHeaders}},
		{rule: fault.Rule{Kind: fault.StallBeforeHeaders}},
		{rule: fault.Rule{Kind: fault.Reset}},
		{rule: fault.Rule{Kind: fault.Status, Status: 500}},
		{rule: fault.Rule{Kind: fault.Status, Status: 503, RetryAfter: "1"}},
		{rule: fault.Rule{Kind: fault.Status, Status: 429, RetryAfter: "3600"}},
		{rule: fault.Rule{Kind: fault.Status, Status: 503, Times: 1}, mayServe: true, mustServe: true}, // retried
		{rule: fault.Rule{Kind: fault.Reset, Times: 1}, mayServe: true, mustServe: true},               // retried
		{rule: fault.Rule{Kind: fault.Trickle}, mayServe: true, mustServe: true},                       // slow but right
		{rule: fault.Rule{Kind: fault.TokenError, PathContains: "/token"}, token: true},                // auth server down
		{rule: fault.Rule{Kind: fault.TokenError, PathContains: "/token", Status: 401}, token: true},   // auth refused
	} {
		name := string(tc.rule.Kind) + fmt.Sprint(tc.rule.Status, tc.rule.RetryAfter, tc.rule.Times)
		t.Run(name, func(t *testing.T) {
			up := newUpstream(t)
			_, layer := up.PushOneLayer("library/app", "v1", 300<<10)
			want := layer.Bytes
			tm := newMirrorWith(t, t.TempDir(), map[string][]string{"docker.io": {up.URL()}}, faultClient)
			url := tm.srv.URL + layer.Path

			up.Faults.RequireToken(tc.token)
			rule := tc.rule
			if rule.PathContains == "" {
				rule.PathContains = "/blobs/"
				rule.Method = http.MethodGet
			}
			up.Faults.Set(rule)
			status, body, clean := fetch(t, url)
			complete := status == http.StatusOK && clean
			switch {
			case complete && !bytes.Equal(body, want):
				t.Fatalf("client got a complete 200 of wrong bytes (%d bytes)", len(body))
			case complete && !tc.mayServe:
				t.Fatalf("client got the blob although every upstream answer was faulty")
			case !complete && tc.mustServe:
				t.Fatalf("status %d clean %v: a recoverable fault failed the pull", status, clean)
			}
			if up.Faults.Fired(tc.rule.Kind) == 0 {
				t.Fatal("the fault never fired; the test proves nothing")
			}
			assertStoreIntact(t, tm)

			up.Faults.Clear()
			status, body, clean = fetch(t, url)
			if status != http.StatusOK || !clean || !bytes.Equal(body, want) {
				t.Fatalf("healthy upstream afterwards: status %d clean %v equal %v", status, clean, bytes.Equal(body, want))
			}
			assertStoreIntact(t, tm)
		})
	}
}

// TestManifestFaults: a substituted or damaged manifest is never served or stored under
// the digest asked for; with a cached tag, failures serve the cache; a fixed upstream is
// used again afterwards.
func TestManifestFaults(t *testing.T) {
	for _, kind := range []fault.Kind{fault.OtherManifest, fault.FlipByte, fault.Truncate, fault.StallAfterHeaders, fault.Reset} {
		t.Run(string(kind), func(t *testing.T) {
			up := newUpstream(t)
			img := randomImage(t, 1024, 1)
			other := randomImage(t, 1024, 1)
			otherRaw, _ := other.RawManifest()
			up.Push("library/app", "v1", img)
			want, _ := img.Digest()
			tm := newMirrorWith(t, t.TempDir(), map[string][]string{"docker.io": {up.URL()}}, faultClient, func(o *Options) { o.TagFreshness = 0 })

			// Cold, by digest: an error, never the wrong manifest.
			up.Faults.Set(fault.Rule{Kind: kind, Method: http.MethodGet, PathContains: "/manifests/", Manifest: otherRaw})
			status, body, clean := fetch(t, tm.srv.URL+"/v2/library/app/manifests/"+want.String())
			if status == http.StatusOK && clean {
				t.Fatalf("faulty manifest served by digest: %s", body)
			}
			if _, err := tm.store.Size(digest.Digest(want.String())); err == nil {
				t.Fatal("faulty manifest stored")
			}
			assertStoreIntact(t, tm)

			// Healthy: the tag is cached.
			up.Faults.Clear()
			if status, _, _ := fetch(t, tm.srv.URL+"/v2/library/app/manifests/v1"); status != 200 {
				t.Fatalf("healthy tag: %d", status)
			}

			// Faulty again, and the tag is revalidated each time: the cached manifest is served.
			// The HEAD is faulted too, so the fetch path runs.
			up.Faults.Set(
				fault.Rule{Kind: fault.Status, Status: 500, Method: http.MethodHead},
				fault.Rule{Kind: kind, Method: http.MethodGet, PathContains: "/manifests/", Manifest: otherRaw},
			)
			resp, body := tm.get(t, http.MethodGet, "/v2/library/app/manifests/v1")
			raw, _ := img.RawManifest()
			if resp.StatusCode != 200 || !bytes.Equal(body, raw) || resp.Header.Get("Docker-Content-Digest") != want.String() {
				t.Fatalf("stale-if-error: %d %s", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
			}

			// Fixed upstream with a moved tag: the new digest is seen.
			up.Faults.Clear()
			up.Push("library/app", "v1", other)
			od, _ := other.Digest()
			if resp, _ := tm.get(t, http.MethodGet, "/v2/library/app/manifests/v1"); resp.Header.Get("Docker-Content-Digest") != od.String() {
				t.Fatalf("fixed upstream not used again: %s", resp.Header.Get("Docker-Content-Digest"))
			}
			assertStoreIntact(t, tm)
		})
	}
}

// TestCachedServedWhileUpstreamStalls: a request stuck on a stalled upstream does not
// hold up cached content.
func TestCachedServedWhileUpstreamStalls(t *testing.T) {
	up := newUpstream(t)
	cached := randomImage(t, 1<<20, 1)
	cold := randomImage(t, 1<<20, 1)
	up.Push("library/cached", "v1", cached)
	up.Push("library/cold", "v1", cold)
	tm := newMirrorWith(t, t.TempDir(), map[string][]string{"docker.io": {up.URL()}}, faultClient)
	tm.pull(t, "library/cached:v1")

	cl, _ := cold.Layers()
	cd, _ := cl[0].Digest()
	up.Faults.Set(fault.Rule{Kind: fault.StallBeforeHeaders, PathContains: cd.String()})
	stuck := make(chan struct{})
	go func() {
		defer close(stuck)
		fetch(t, tm.srv.URL+"/v2/library/cold/blobs/"+cd.String())
	}()
	for deadline := time.Now().Add(30 * time.Second); up.Faults.Fired(fault.StallBeforeHeaders) == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the cold request never reached the stalling upstream")
		}
	}
	for i := 0; i < 5; i++ {
		tm.pull(t, "library/cached:v1")
	}
	select {
	case <-stuck:
		t.Fatal("the stalled request ended before the cached pulls were checked; the test proves nothing")
	default:
	}
	up.Faults.Close() // end the stall
	<-stuck
}
