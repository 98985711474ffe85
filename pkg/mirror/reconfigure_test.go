package mirror

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/node-mirror/node-mirror/internal/wire"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

func clientsFor(t *testing.T, url string) map[string]*upstream.Client {
	t.Helper()
	c, err := upstream.New("docker.io", []string{url}, "", "", upstream.Options{Logger: nopLogger()})
	if err != nil {
		t.Fatal(err)
	}
	return map[string]*upstream.Client{"docker.io": c}
}

func poll(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReloadClosesOldConnections: a reload closes the old clients' pooled connections at
// once; a connection busy with a download keeps going, the download delivers the right
// bytes, and the connection is closed when it is done instead of idling in a pool that
// nothing uses any more.
func TestReloadClosesOldConnections(t *testing.T) {
	up := newUpstream(t)
	up.PushRandomImage("library/small", "v1", 2, 4<<10)
	_, slow := up.PushOneLayer("library/slow", "v1", 256<<10)
	want := slow.Bytes
	release := make(chan struct{})
	up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || r.URL.Path != slow.Path {
			return false
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(want)))
		w.Write(want[:len(want)/2])
		http.NewResponseController(w).Flush()
		<-release
		w.Write(want[len(want)/2:])
		return true
	})
	var closeRelease atomic.Bool
	defer func() {
		if closeRelease.CompareAndSwap(false, true) {
			close(release)
		}
	}()
	poll(t, "the pushes' connections are closed", func() bool { return up.OpenConns() == 0 })

	tm := newMirror(t, nil, func(o *Options) { o.Registries = clientsFor(t, up.URL()) })
	tm.pull(t, "library/small:v1")
	if up.OpenConns() == 0 {
		t.Fatal("no pooled upstream connection after a pull; the test proves nothing")
	}

	resp, err := http.Get(tm.srv.URL + slow.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	first := make([]byte, len(want)/2)
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatal(err)
	}

	if err := tm.Reconfigure(Options{Registries: clientsFor(t, up.URL()), DefaultRegistry: "docker.io"}); err != nil {
		t.Fatal(err)
	}
	poll(t, "only the download's connection is open", func() bool { return up.OpenConns() == 1 })

	closeRelease.Store(true)
	close(release)
	rest, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(append(first, rest...), want) {
		t.Fatalf("the download across the reload: %v, right bytes: %v", err, bytes.Equal(append(first, rest...), want))
	}
	poll(t, "the download's connection is closed after it", func() bool { return up.OpenConns() == 0 })
	// The new clients serve what comes next.
	tm.pull(t, "library/small:v1")
}

// TestManifestLimitIsConfiguredAndReloaded: the refusal names the configured limit, and
// a reload changes the limit.
func TestManifestLimitIsConfiguredAndReloaded(t *testing.T) {
	up := newUpstream(t)
	up.Push("library/app", "v1", randomImage(t, 1024, 3))
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, func(o *Options) { o.MaxManifestSize = 100 })
	check := func(limit int64, wantOK bool) {
		t.Helper()
		resp, body := tm.get(t, http.MethodGet, "/v2/library/app/manifests/v1")
		if wantOK {
			if resp.StatusCode != 200 {
				t.Fatalf("limit %d: %d %s", limit, resp.StatusCode, body)
			}
			return
		}
		var env wire.Envelope
		if json.Unmarshal(body, &env) != nil || len(env.Errors) != 1 || env.Errors[0].Code != "MANIFEST_INVALID" ||
			!strings.Contains(env.Errors[0].Message, fmt.Sprintf("%d bytes", limit)) {
			t.Fatalf("limit %d: %d %s", limit, resp.StatusCode, body)
		}
	}
	check(100, false)
	reload := func(limit int64) {
		if err := tm.Reconfigure(Options{Registries: tm.policy.Load().registries, DefaultRegistry: "docker.io", MaxManifestSize: limit}); err != nil {
			t.Fatal(err)
		}
	}
	reload(200)
	check(200, false)
	reload(1 << 20)
	check(1<<20, true)
}

// TestEagerFetchReloaded: eager fetching follows the configured worker count, 0 is off,
// and a reload starts and stops workers.
func TestEagerFetchReloaded(t *testing.T) {
	up := newUpstream(t)
	img := randomImage(t, 8<<10, 3)
	up.Push("library/app", "v1", img)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}})
	workers := func() int {
		tm.eagerMu.Lock()
		defer tm.eagerMu.Unlock()
		return len(tm.eagerStops)
	}
	regs := tm.policy.Load().registries
	for _, n := range []int{0, 3, 1, 0, 2} {
		if n != 0 || workers() != 0 {
			if err := tm.Reconfigure(Options{Registries: regs, DefaultRegistry: "docker.io", EagerFetch: n}); err != nil {
				t.Fatal(err)
			}
		}
		if got := workers(); got != n || tm.eagerOn.Load() != (n > 0) {
			t.Fatalf("eager_fetch %d: %d workers, on %v", n, got, tm.eagerOn.Load())
		}
	}
	// On again after being off: fetching the manifest brings its blobs.
	if resp, body := tm.get(t, http.MethodGet, "/v2/library/app/manifests/v1"); resp.StatusCode != 200 {
		t.Fatalf("manifest: %d %s", resp.StatusCode, body)
	}
	want := layerDigests(t, img)
	waitStored(t, tm, want)
	waitNoDownloads(t, tm)
	for _, d := range want {
		if n := up.CountPath(http.MethodGet, "/v2/library/app/blobs/"+d.String()); n != 1 {
			t.Fatalf("%s fetched %d times", d, n)
		}
	}
}
