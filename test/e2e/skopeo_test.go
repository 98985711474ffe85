package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// skopeoCopy runs skopeo copy and fails the test, with skopeo's output, if it fails.
func skopeoCopy(t *testing.T, registriesConf string, args ...string) {
	t.Helper()
	out, err := testenv.Skopeo(t, registriesConf, append([]string{"copy"}, args...)...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
}

// requireOCILayout fails unless the OCI layout in dir holds every digest in want.
func requireOCILayout(t *testing.T, dir string, want []v1.Hash) {
	t.Helper()
	for _, d := range want {
		if _, err := os.Stat(filepath.Join(dir, "blobs", d.Algorithm, d.Hex)); err != nil {
			t.Errorf("skopeo's OCI layout is missing %s: %v", d, err)
		}
	}
}

// TestSkopeoPathPrefixRoute: containers/image cannot send ?ns=, so it names the registry
// as the first path element (127.0.0.1:PORT/docker.io/library/x). skopeo copies every
// platform of an OCI index that way, and again with the upstream down.
func TestSkopeoPathPrefixRoute(t *testing.T) {
	t.Parallel()
	up := testenv.NewUpstream(t)
	idx := up.PushRandomIndex("library/prefixed", "v1", 2, 128<<10)
	m := mirrorOf(t, up)
	src := "docker://" + m.Addr + "/docker.io/library/prefixed:v1"

	cold := filepath.Join(t.TempDir(), "oci")
	skopeoCopy(t, "", "--all", "--preserve-digests", "--src-tls-verify=false", src, "oci:"+cold+":v1")
	requireOCILayout(t, cold, idx.Digests())
	requireIndexDigest(t, cold, idx.Digest)
	for _, img := range idx.Platforms {
		requireOneDownloadEach(t, up, img.Blobs())
	}

	up.Stop()
	warm := filepath.Join(t.TempDir(), "oci")
	skopeoCopy(t, "", "--all", "--preserve-digests", "--src-tls-verify=false", src, "oci:"+warm+":v1")
	requireOCILayout(t, warm, idx.Digests())
}

// TestSkopeoRegistriesConfMirror: skopeo pulls docker.io/library/x as CRI-O and Podman
// do, through a registries.conf mirror entry 127.0.0.1:PORT/docker.io, then again with
// the upstream down. The registry's own location is a dead loopback port, so the copy
// can only have come through the mirror.
func TestSkopeoRegistriesConfMirror(t *testing.T) {
	t.Parallel()
	up := testenv.NewUpstream(t)
	img := up.PushRandomImage("library/viaconf", "v3", 3, 256<<10)
	m := mirrorOf(t, up)
	conf := testenv.RegistriesConfMirror("docker.io", m.Addr+"/docker.io")
	src := "docker://docker.io/library/viaconf:v3"

	for _, phase := range []string{"cold", "upstream-down"} {
		if phase == "upstream-down" {
			up.Stop()
		}
		// The dir transport keeps the manifest and blobs byte for byte, named by digest.
		dst := filepath.Join(t.TempDir(), "dir")
		skopeoCopy(t, conf, src, "dir:"+dst)
		for _, d := range img.Blobs() {
			if _, err := os.Stat(filepath.Join(dst, d.Hex)); err != nil {
				t.Errorf("%s: skopeo's copy is missing blob %s: %v", phase, d, err)
			}
		}
		got, _, err := v1.SHA256(mustOpen(t, filepath.Join(dst, "manifest.json")))
		if err != nil {
			t.Fatal(err)
		}
		if got != img.Digest {
			t.Errorf("%s: skopeo's manifest is %s, want %s", phase, got, img.Digest)
		}
		if phase == "cold" {
			requireOneDownloadEach(t, up, img.Blobs())
		}
	}
}

// requireIndexDigest fails unless the layout's index.json points at the index itself.
func requireIndexDigest(t *testing.T, dir string, want v1.Hash) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		t.Fatal(err)
	}
	var layout struct {
		Manifests []struct{ Digest string } `json:"manifests"`
	}
	if err := json.Unmarshal(b, &layout); err != nil {
		t.Fatal(err)
	}
	for _, m := range layout.Manifests {
		if m.Digest == want.String() {
			return
		}
	}
	t.Errorf("index.json of skopeo's copy does not name the index %s:\n%s", want, b)
}

func mustOpen(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}
