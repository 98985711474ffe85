package prefetch

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/testenv"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/mirror"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// testMirror is a real mirror in front of a real registry, both on loopback.
type testMirror struct {
	url   string
	up    *testenv.Upstream
	store *contentstore.Store
}

func newTestMirror(t *testing.T, budget contentstore.Budget) *testMirror {
	t.Helper()
	up := testenv.NewUpstream(t)
	store, err := contentstore.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	store.SetBudget(budget)
	cl, err := upstream.New("docker.io", []string{up.URL()}, "", "", upstream.Options{MaxAttempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	m, err := mirror.New(mirror.Options{Store: store, Registries: map[string]*upstream.Client{"docker.io": cl},
		DefaultRegistry: "docker.io", Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), EagerFetch: 0})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(m)
	t.Cleanup(func() {
		srv.Close()
		m.Close()
	})
	return &testMirror{url: srv.URL, up: up, store: store}
}

func (tm *testMirror) push(t *testing.T, repoTag string, img v1.Image) {
	t.Helper()
	repo, tag, _ := strings.Cut(repoTag, ":")
	tm.up.Push(repo, tag, img)
}

func (tm *testMirror) pushIndex(t *testing.T, repoTag string, images map[string]v1.Image) {
	t.Helper()
	var adds []mutate.IndexAddendum
	for _, p := range slices.Sorted(func(yield func(string) bool) {
		for k := range images {
			if !yield(k) {
				return
			}
		}
	}) {
		pl, err := v1.ParsePlatform(p)
		if err != nil {
			t.Fatal(err)
		}
		adds = append(adds, mutate.IndexAddendum{Add: images[p], Descriptor: v1.Descriptor{Platform: pl}})
	}
	repo, tag, _ := strings.Cut(repoTag, ":")
	tm.up.PushIndex(repo, tag, mutate.AppendManifests(empty.Index, adds...))
}

func randomImage(t *testing.T, layers int) v1.Image {
	t.Helper()
	img, err := random.Image(4<<10, int64(layers))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// blobsOf is an image's config and layer digests.
func blobsOf(t *testing.T, img v1.Image) []digest.Digest {
	t.Helper()
	cfg, _ := img.ConfigName()
	out := []digest.Digest{digest.Digest(cfg.String())}
	ls, _ := img.Layers()
	for _, l := range ls {
		d, _ := l.Digest()
		out = append(out, digest.Digest(d.String()))
	}
	return out
}

func (tm *testMirror) stored(d digest.Digest) bool {
	_, err := tm.store.Size(d)
	return err == nil
}

// recorder is a stand-in mirror that notes what prefetch asks for and knows nothing.
type recorder struct {
	mu   sync.Mutex
	reqs []string // path?ns
}

func (r *recorder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	r.reqs = append(r.reqs, req.URL.Path+"?ns="+req.URL.Query().Get("ns"))
	r.mu.Unlock()
	http.Error(w, `{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}`, http.StatusNotFound)
}

// TestImageReferences: each way of naming an image reaches the mirror as the registry
// (ns), repository and reference the engines would ask for; names that are not image
// references fail without a request.
func TestImageReferences(t *testing.T) {
	d := "sha256:" + strings.Repeat("ab", 32)
	for _, tc := range []struct {
		image string
		want  string // first request, "" for none
	}{
		{"nginx", "/v2/library/nginx/manifests/latest?ns=docker.io"},
		{"nginx:1.27", "/v2/library/nginx/manifests/1.27?ns=docker.io"},
		{"docker.io/library/nginx:1.27", "/v2/library/nginx/manifests/1.27?ns=docker.io"},
		{"index.docker.io/team/app:v1", "/v2/team/app/manifests/v1?ns=docker.io"},
		{"ghcr.io/org/app@" + d, "/v2/org/app/manifests/" + d + "?ns=ghcr.io"},
		{"quay.io/a/b/c:tag", "/v2/a/b/c/manifests/tag?ns=quay.io"},
		{"localhost:5000/app:v1", "/v2/app/manifests/v1?ns=localhost:5000"},
		{"registry.k8s.io/pause:3.10", "/v2/pause/manifests/3.10?ns=registry.k8s.io"},
		{"UPPER/case:v1", ""},
		{"app:bad tag", ""},
		{"ghcr.io/org/app@sha256:short", ""},
	} {
		t.Run(tc.image, func(t *testing.T) {
			rec := &recorder{}
			srv := httptest.NewServer(rec)
			defer srv.Close()
			res, err := Run(context.Background(), Options{MirrorURL: srv.URL}, []string{tc.image})
			if err == nil || res.Images != 0 {
				t.Fatalf("an image the mirror does not know: %+v, %v", res, err)
			}
			rec.mu.Lock()
			defer rec.mu.Unlock()
			if tc.want == "" {
				if len(rec.reqs) != 0 {
					t.Fatalf("invalid reference %q reached the mirror: %v", tc.image, rec.reqs)
				}
				return
			}
			if len(rec.reqs) != 1 || rec.reqs[0] != tc.want {
				t.Fatalf("requests %v, want [%s]", rec.reqs, tc.want)
			}
		})
	}
}

func TestReadImageList(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, body string
		want       []string
	}{
		{"plain", "nginx:1.27\nghcr.io/org/app:v1\n", []string{"nginx:1.27", "ghcr.io/org/app:v1"}},
		{"comments and blanks", "# warm these\n\n  nginx:1.27  \n\t# indented comment\nredis # trailing comment\n", []string{"nginx:1.27", "redis"}},
		{"no final newline", "a\nb", []string{"a", "b"}},
		{"crlf", "a\r\nb\r\n", []string{"a", "b"}},
		{"only comments", "# nothing\n", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_"))
			if err := os.WriteFile(p, []byte(tc.body), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := ReadImageList(p)
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if _, err := ReadImageList(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("a missing list was read")
	}
}

// TestPlatformSelection: with --platform only that image of an index is fetched, without
// it every image; a platform the index lacks, or a malformed one, is an error.
func TestPlatformSelection(t *testing.T) {
	for _, tc := range []struct {
		platform string
		want     []string // platforms whose blobs land
		fails    bool
	}{
		{"", []string{"linux/amd64", "linux/arm64", "linux/arm/v7"}, false},
		{"linux/arm64", []string{"linux/arm64"}, false},
		{"linux/arm/v7", []string{"linux/arm/v7"}, false},
		{"windows/amd64", nil, true},
		{"not/a/plat/form", nil, true},
	} {
		t.Run(tc.platform, func(t *testing.T) {
			tm := newTestMirror(t, contentstore.Budget{})
			images := map[string]v1.Image{"linux/amd64": randomImage(t, 2), "linux/arm64": randomImage(t, 2), "linux/arm/v7": randomImage(t, 1)}
			tm.pushIndex(t, "library/multi:v1", images)
			res, err := Run(context.Background(), Options{MirrorURL: tm.url, Platform: tc.platform}, []string{"docker.io/library/multi:v1"})
			if tc.fails {
				if err == nil {
					t.Fatalf("platform %q: no error, %+v", tc.platform, res)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			wantBlobs := 0
			for p, img := range images {
				in := slices.Contains(tc.want, p)
				if in {
					wantBlobs += len(blobsOf(t, img))
				}
				for _, d := range blobsOf(t, img) {
					if tm.stored(d) != in {
						t.Errorf("%s blob %s stored: %v, want %v", p, d, tm.stored(d), in)
					}
				}
			}
			if res.Images != 1 || res.Blobs != wantBlobs || res.Fetched != wantBlobs || res.Failed != 0 {
				t.Fatalf("result %+v, want %d blobs fetched", res, wantBlobs)
			}
			// Again: everything is already there.
			res, err = Run(context.Background(), Options{MirrorURL: tm.url, Platform: tc.platform}, []string{"docker.io/library/multi:v1"})
			if err != nil || res.Cached != wantBlobs || res.Fetched != 0 {
				t.Fatalf("second run: %+v, %v; want %d cached", res, err, wantBlobs)
			}
		})
	}
}

// TestPassThroughIsAFailure: a mirror that cannot store (its budget is one byte) still
// serves every blob, marked pass-through; prefetch must report that nothing landed.
func TestPassThroughIsAFailure(t *testing.T) {
	tm := newTestMirror(t, contentstore.Budget{MaxBytes: 1})
	img := randomImage(t, 2)
	tm.push(t, "library/app:v1", img)
	var out strings.Builder
	res, err := Run(context.Background(), Options{MirrorURL: tm.url, Out: &out}, []string{"library/app:v1"})
	n := len(blobsOf(t, img))
	if err == nil || res.Failed != n || res.Fetched != 0 {
		t.Fatalf("prefetch through a mirror that stores nothing: %+v, %v\n%s", res, err, out.String())
	}
	if !strings.Contains(err.Error(), "not stored") || !strings.Contains(out.String(), "not stored") {
		t.Fatalf("the error does not say the blobs were not stored: %v\n%s", err, out.String())
	}
	for _, d := range blobsOf(t, img) {
		if tm.stored(d) {
			t.Fatalf("%s was stored under a one-byte budget", d)
		}
	}
}

// TestAnswerWithoutCacheHeader: something that is not a node-mirror serves the bytes but
// cannot say they were stored; that is not a success.
func TestAnswerWithoutCacheHeader(t *testing.T) {
	up := testenv.NewUpstream(t)
	img := up.Push("library/app", "v1", randomImage(t, 1)).Image
	res, err := Run(context.Background(), Options{MirrorURL: up.URL()}, []string{"library/app:v1"})
	if err == nil || res.Failed != len(blobsOf(t, img)) {
		t.Fatalf("a plain registry taken for a mirror: %+v, %v", res, err)
	}
}

// TestUpstreamOrMirrorDown: with the upstream gone (nothing cached) or the mirror itself
// unreachable, prefetch fails and says which.
func TestUpstreamOrMirrorDown(t *testing.T) {
	tm := newTestMirror(t, contentstore.Budget{})
	tm.push(t, "library/app:v1", randomImage(t, 1))
	tm.up.Stop()
	res, err := Run(context.Background(), Options{MirrorURL: tm.url}, []string{"library/app:v1"})
	if err == nil || res.Images != 0 || !strings.Contains(err.Error(), "UNAVAILABLE") {
		t.Fatalf("upstream down: %+v, %v", res, err)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() { // a mirror that hangs up on every connection
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, err = Run(context.Background(), Options{MirrorURL: "http://" + ln.Addr().String()}, []string{"library/app:v1"})
	if err == nil || !strings.Contains(err.Error(), "reaching node-mirror") {
		t.Fatalf("mirror down: %v", err)
	}
}
