package testenv

import (
	"io"
	"net/http"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"
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
