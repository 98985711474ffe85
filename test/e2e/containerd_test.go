// Package e2e pulls through the node-mirror binary with real engines: Debian's containerd
// (1.6, `ctr content fetch --hosts-dir`) and skopeo. Run with `make e2e`, as root.
package e2e

import (
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// mirrorOf starts a mirror that serves docker.io from up.
func mirrorOf(t *testing.T, up *testenv.Upstream) *testenv.Mirror {
	t.Helper()
	return testenv.StartMirror(t, testenv.MirrorOptions{Upstreams: []string{up.Flag("docker.io")}})
}

// fetch pulls ref into c through the hosts dir and fails the test, with ctr's output, if
// that fails.
func fetch(t *testing.T, c *testenv.Containerd, hostsDir, ref string, flags ...string) {
	t.Helper()
	out, err := c.Fetch(hostsDir, ref, flags...)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
}

// requireContent fails unless every digest in want is in c's content store.
func requireContent(t *testing.T, c *testenv.Containerd, want []v1.Hash) {
	t.Helper()
	have := c.Content()
	var missing []string
	for _, d := range want {
		if !have[d.String()] {
			missing = append(missing, d.String())
		}
	}
	if len(missing) > 0 {
		t.Fatalf("containerd is missing %d of %d blobs: %s", len(missing), len(want), strings.Join(missing, " "))
	}
}

// requireOneDownloadEach fails unless the upstream served each blob exactly once.
func requireOneDownloadEach(t *testing.T, up *testenv.Upstream, blobs []v1.Hash) {
	t.Helper()
	for _, d := range blobs {
		if n := up.BlobGETs(d); n != 1 {
			t.Errorf("upstream served blob %s %d times, want once\nupstream requests:\n%s", d, n, up.RequestLog())
		}
	}
}

func hexes(ds []v1.Hash) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.String()
	}
	return out
}

// TestContainerdPullsImageThroughMirror: containerd fetches a multi-layer image through
// the mirror, then a containerd with an empty store fetches it again with the upstream
// down, so every byte of the second pull comes from the mirror's cache.
func TestContainerdPullsImageThroughMirror(t *testing.T) {
	t.Parallel()
	up := testenv.NewUpstream(t)
	img := up.PushRandomImage("library/multilayer", "v1", 5, 512<<10)
	m := mirrorOf(t, up)
	hosts := testenv.HostsDir(t, m.URL, "docker.io")
	ref := "docker.io/library/multilayer:v1"

	cold := testenv.StartContainerd(t)
	fetch(t, cold, hosts, ref)
	requireContent(t, cold, img.Digests())
	requireOneDownloadEach(t, up, img.Blobs())

	up.Stop()
	warm := testenv.StartContainerd(t)
	fetch(t, warm, hosts, ref)
	requireContent(t, warm, img.Digests())
}

// TestContainerdPullsIndexThroughMirror: containerd fetches a multi-platform index
// (linux/amd64 + linux/arm64) through the mirror, all platforms in one case and one
// platform in the other, then removes what it fetched and fetches it again with the
// upstream down.
func TestContainerdPullsIndexThroughMirror(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		flags   []string
		want    func(testenv.Index) []v1.Hash
		mustNot func(testenv.Index) []v1.Hash // not fetched: the other platform's image
	}{
		{
			name:  "all-platforms",
			flags: []string{"--all-platforms"},
			want:  testenv.Index.Digests,
		},
		{
			name:  "platform-arm64",
			flags: []string{"--platform", "linux/arm64"},
			want:  func(x testenv.Index) []v1.Hash { return x.PlatformDigests("linux/arm64") },
			mustNot: func(x testenv.Index) []v1.Hash {
				return x.Platforms["linux/amd64"].Digests()
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			up := testenv.NewUpstream(t)
			idx := up.PushRandomIndex("library/multiarch", "v2", 3, 256<<10)
			m := mirrorOf(t, up)
			hosts := testenv.HostsDir(t, m.URL, "docker.io")
			ref := "docker.io/library/multiarch:v2"
			want := tc.want(idx)

			c := testenv.StartContainerd(t)
			fetch(t, c, hosts, ref, tc.flags...)
			requireContent(t, c, want)
			if tc.mustNot != nil {
				have := c.Content()
				for _, d := range tc.mustNot(idx) {
					if have[d.String()] {
						t.Errorf("containerd fetched %s, which belongs to another platform", d)
					}
				}
			}
			var blobs []v1.Hash
			for _, d := range want {
				if d != idx.Digest && !isManifest(idx, d) {
					blobs = append(blobs, d)
				}
			}
			requireOneDownloadEach(t, up, blobs)

			up.Stop()
			c.RemoveContent(hexes(want)...)
			if have := c.Content(); len(have) != 0 {
				t.Fatalf("content left after ctr content rm: %v", have)
			}
			fetch(t, c, hosts, ref, tc.flags...)
			requireContent(t, c, want)
		})
	}
}

func isManifest(x testenv.Index, d v1.Hash) bool {
	for _, img := range x.Platforms {
		if img.Digest == d {
			return true
		}
	}
	return false
}
