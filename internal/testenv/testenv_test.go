package testenv

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/fault"
)

func get(t *testing.T, url string) (int, error) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// The tests that use Upstream rely on this: pushes are not logged, downloads are counted,
// Stop refuses connections, and Start serves the same content on the same address.
func TestUpstreamCountsStopsAndStarts(t *testing.T) {
	up := NewUpstream(t)
	img := up.PushRandomImage("library/a", "v1", 2, 1024)
	if reqs := up.Requests(); len(reqs) != 0 {
		t.Fatalf("pushes were logged: %v", reqs)
	}
	blob := up.URL() + "/v2/library/a/blobs/" + img.Layers[0].String()
	for range 3 {
		if code, err := get(t, blob); err != nil || code != 200 {
			t.Fatalf("GET blob: %d %v", code, err)
		}
	}
	if n := up.BlobGETs(img.Layers[0]); n != 3 {
		t.Fatalf("BlobGETs = %d, want 3\n%s", n, up.RequestLog())
	}
	if n := up.BlobGETs(img.Layers[1]); n != 0 {
		t.Fatalf("BlobGETs of an untouched blob = %d", n)
	}
	if r := up.Requests()[0]; r.Method != "GET" || r.Status != 200 {
		t.Fatalf("request logged as %+v", r)
	}

	addr := up.Host()
	up.Stop()
	if _, err := get(t, blob); err == nil {
		t.Fatal("GET succeeded with the upstream stopped")
	}
	up.Start()
	if up.Host() != addr {
		t.Fatalf("address changed across Stop/Start: %s, then %s", addr, up.Host())
	}
	if code, err := get(t, blob); err != nil || code != 200 {
		t.Fatalf("GET blob after Start: %d %v", code, err)
	}
	up.ResetRequests()
	if len(up.Requests()) != 0 {
		t.Fatal("ResetRequests kept requests")
	}
}

// The index is served byte for byte as described, and every platform's image is whole.
func TestPushRandomIndex(t *testing.T) {
	up := NewUpstream(t)
	idx := up.PushRandomIndex("library/multi", "v1", 2, 512)
	ref, err := name.ParseReference(up.Host()+"/library/multi:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Get(ref, up.RemoteOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != idx.Digest || string(desc.Manifest) != string(idx.Manifest) || desc.MediaType != idx.MediaType {
		t.Fatalf("served %s %s, want %s %s", desc.MediaType, desc.Digest, idx.MediaType, idx.Digest)
	}
	ii, err := desc.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Index(ii); err != nil {
		t.Fatal(err)
	}
	if len(idx.Platforms) != 2 || len(idx.Digests()) != 1+2*(1+1+2) {
		t.Fatalf("index describes %d platforms and %d digests", len(idx.Platforms), len(idx.Digests()))
	}
	for p, img := range idx.Platforms {
		cf, err := img.Image.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if got := cf.OS + "/" + cf.Architecture; got != p {
			t.Errorf("image for %s has config platform %s", p, got)
		}
	}
}

func TestHostsTOML(t *testing.T) {
	got := HostsTOML(DockerHubServer, "http://127.0.0.1:5000")
	want := `server = "https://registry-1.docker.io"

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
`
	if got != want {
		t.Fatalf("got:\n%s\nwant:\n%s", got, want)
	}
}

// What the mirror's tests rely on: the hook sees a request after it was logged and may
// answer it; Faults apply to the code under test and never to the push helpers; the log
// keeps Range headers; open connections are counted.
func TestUpstreamHookFaultsAndConnections(t *testing.T) {
	for _, disk := range []bool{false, true} {
		t.Run(fmt.Sprint("disk=", disk), func(t *testing.T) {
			var opts []UpstreamOption
			if disk {
				opts = append(opts, WithDiskBlobs())
			}
			up := NewUpstream(t, opts...)
			img, layer := up.PushOneLayer("library/a", "v1", 4096)
			if len(img.Layers) != 1 || layer.Digest.String() != img.Layers[0].String() || digest.FromBytes(layer.Bytes) != layer.Digest {
				t.Fatalf("PushOneLayer: layer %s of %d bytes, image layers %v", layer.Digest, len(layer.Bytes), img.Layers)
			}
			// The server sees a connection closed a moment after the client closed it.
			waitConns := func(n int, what string) {
				t.Helper()
				for deadline := time.Now().Add(30 * time.Second); up.OpenConns() != n; time.Sleep(10 * time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatalf("%d open connections %s, want %d", up.OpenConns(), what, n)
					}
				}
			}
			waitConns(0, "after the push")

			client := &http.Client{Transport: &http.Transport{}}
			do := func(rng string) (int, []byte) {
				t.Helper()
				req, _ := http.NewRequest(http.MethodGet, up.URL()+layer.Path, nil)
				if rng != "" {
					req.Header.Set("Range", rng)
				}
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, b
			}
			if code, b := do("bytes=10-"); code != http.StatusPartialContent || !bytes.Equal(b, layer.Bytes[10:]) {
				t.Fatalf("ranged GET: %d, %d bytes", code, len(b))
			}
			waitConns(1, "after one request on a keep-alive client")

			// Faults distort answers to the code under test; pushes meanwhile are untouched.
			up.Faults.Set(fault.Rule{Kind: fault.Status, Status: http.StatusServiceUnavailable})
			if code, _ := do(""); code != http.StatusServiceUnavailable {
				t.Fatalf("GET with a status fault: %d", code)
			}
			up.PushOneLayer("library/b", "v1", 1024)
			up.Faults.Clear()

			// The hook answers before Faults and the registry.
			up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
				if r.URL.Path != layer.Path {
					return false
				}
				w.WriteHeader(http.StatusTeapot)
				return true
			})
			if code, _ := do(""); code != http.StatusTeapot {
				t.Fatalf("GET with a hook: %d", code)
			}
			up.PushOneLayer("library/c", "v1", 1024)
			up.SetHook(nil)
			if code, b := do(""); code != http.StatusOK || !bytes.Equal(b, layer.Bytes) {
				t.Fatalf("GET after the hook was removed: %d, %d bytes", code, len(b))
			}

			want := []Request{
				{Method: "GET", Path: layer.Path, Status: 206, Range: "bytes=10-"},
				{Method: "GET", Path: layer.Path, Status: 503},
				{Method: "GET", Path: layer.Path, Status: 418},
				{Method: "GET", Path: layer.Path, Status: 200},
			}
			got := up.Requests()
			for i := range got {
				got[i].UserAgent = ""
			}
			if !slices.Equal(got, want) {
				t.Fatalf("request log:\n%s", up.RequestLog())
			}
			if n := up.CountPath(http.MethodGet, layer.Path); n != 4 || up.AnyBlobGETs() != 4 {
				t.Fatalf("CountPath %d, AnyBlobGETs %d, want 4", n, up.AnyBlobGETs())
			}
			if r := up.BlobRanges(v1.Hash{Algorithm: "sha256", Hex: layer.Digest.Encoded()}); !slices.Equal(r, []string{"bytes=10-", "", "", ""}) {
				t.Fatalf("BlobRanges %q", r)
			}

			client.CloseIdleConnections()
			waitConns(0, "after the client closed its own")
		})
	}
}

// ServeSlowly streams the body in pieces, with or without a length, and counts its GETs.
func TestServeSlowly(t *testing.T) {
	for _, chunked := range []bool{false, true} {
		t.Run(fmt.Sprint("chunked=", chunked), func(t *testing.T) {
			up := NewUpstream(t)
			body := bytes.Repeat([]byte("slow "), 1000)
			gets := up.ServeSlowly("/v2/x/blobs/y", body, 1000, time.Millisecond, chunked)
			resp, err := http.Get(up.URL() + "/v2/x/blobs/y")
			if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || !bytes.Equal(b, body) {
				t.Fatalf("%v, %d bytes", err, len(b))
			}
			if (resp.ContentLength == -1) != chunked || gets.Load() != 1 {
				t.Fatalf("Content-Length %d with chunked %v; %d GETs", resp.ContentLength, chunked, gets.Load())
			}
		})
	}
}

// The upstream answers ranges as http.ServeContent does over the same bytes, whether it
// streams a single range from the registry's store or answers from a copy of the blob.
func TestUpstreamRangesAsServeContent(t *testing.T) {
	for _, disk := range []bool{false, true} {
		t.Run(fmt.Sprint("disk=", disk), func(t *testing.T) {
			var opts []UpstreamOption
			if disk {
				opts = append(opts, WithDiskBlobs())
			}
			up := NewUpstream(t, opts...)
			_, layer := up.PushOneLayer("library/a", "v1", 10000)
			size := len(layer.Bytes)
			for _, rng := range []string{
				"bytes=0-0", "bytes=0-99", "bytes=100-", "bytes=0-", "bytes=-100", "bytes=-0",
				fmt.Sprintf("bytes=%d-", size-1), fmt.Sprintf("bytes=%d-", size), fmt.Sprintf("bytes=%d-%d", size-10, size+1000),
				fmt.Sprintf("bytes=-%d", size+5), "bytes=10-5", "bytes=0-1,5-6", "bytes=x-y", "chars=0-1", "bytes=5",
			} {
				ref := httptest.NewRecorder()
				req := httptest.NewRequest(http.MethodGet, "/", nil)
				req.Header.Set("Range", rng)
				http.ServeContent(ref, req, "", time.Time{}, bytes.NewReader(layer.Bytes))

				req, _ = http.NewRequest(http.MethodGet, up.URL()+layer.Path, nil)
				req.Header.Set("Range", rng)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != ref.Code || resp.Header.Get("Content-Range") != ref.Header().Get("Content-Range") {
					t.Errorf("%s: %d %q, ServeContent answers %d %q", rng, resp.StatusCode, resp.Header.Get("Content-Range"), ref.Code, ref.Header().Get("Content-Range"))
					continue
				}
				if strings.HasPrefix(ref.Header().Get("Content-Type"), "multipart/") {
					// Bodies differ by their random boundaries.
					if !strings.HasPrefix(resp.Header.Get("Content-Type"), "multipart/byteranges") {
						t.Errorf("%s: Content-Type %q", rng, resp.Header.Get("Content-Type"))
					}
					continue
				}
				if resp.StatusCode/100 == 2 && !bytes.Equal(body, ref.Body.Bytes()) {
					t.Errorf("%s: %d bytes, ServeContent sends %d, or others", rng, len(body), ref.Body.Len())
				}
			}
		})
	}
}

// A single satisfiable range becomes the closed range the registry streams itself; the
// rest are left to http.ServeContent over a copy of the blob.
func TestClosedRange(t *testing.T) {
	up := NewUpstream(t)
	_, layer := up.PushOneLayer("library/a", "v1", 4096)
	size := int64(len(layer.Bytes))
	for _, tc := range []struct {
		rng        string
		start, end int64
		ok         bool
	}{
		{"bytes=0-99", 0, 99, true},
		{"bytes=100-", 100, size - 1, true},
		{"bytes=10-99999999", 10, size - 1, true},
		{"bytes=-100", size - 100, size - 1, true},
		{"bytes=-99999999", 0, size - 1, true},
		{"bytes= 5-6", 5, 6, true},
		{fmt.Sprintf("bytes=%d-", size), 0, 0, false},
		{"bytes=-0", 0, 0, false},
		{"bytes=9-5", 0, 0, false},
		{"bytes=0-1,5-6", 0, 0, false},
		{"bytes=5", 0, 0, false},
		{"items=0-5", 0, 0, false},
	} {
		r := httptest.NewRequest(http.MethodGet, layer.Path, nil)
		start, end, ok := closedRange(up.handler, r, tc.rng)
		if start != tc.start || end != tc.end || ok != tc.ok {
			t.Errorf("%s: %d-%d %v, want %d-%d %v", tc.rng, start, end, ok, tc.start, tc.end, tc.ok)
		}
	}
	r := httptest.NewRequest(http.MethodGet, "/v2/library/a/blobs/sha256:"+strings.Repeat("0", 64), nil)
	if _, _, ok := closedRange(up.handler, r, "bytes=0-1"); ok {
		t.Error("a range of a blob the registry does not have was rewritten")
	}
}
