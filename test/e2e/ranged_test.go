package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// rangedChunk is the mirror's --fetch-chunk-size in these tests: small, so that layers of
// a few MiB span dozens of chunks.
const rangedChunk = 64 << 10

// TestContainerdPullsMultiChunkImageByRanges (issue 12): real containerd pulls an image
// whose layers span many chunks through a mirror that fetches by ranges. containerd 1.6
// fetches its content (`ctr content fetch`); containerd 2.4 pulls and unpacks it (`ctr
// images pull`, through its transfer service). containerd verifies every digest; the
// upstream's log shows each layer fetched once, as several ranges that cover it; and the
// mirror's store holds every blob under the name it hashes to.
func TestContainerdPullsMultiChunkImageByRanges(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		start func(testing.TB) *testenv.Containerd
		pull  func(t *testing.T, c *testenv.Containerd, hosts, ref string)
	}{
		{"containerd-1.6", testenv.StartContainerd, func(t *testing.T, c *testenv.Containerd, hosts, ref string) {
			fetch(t, c, hosts, ref)
		}},
		{"containerd-2.4", testenv.StartContainerd2, func(t *testing.T, c *testenv.Containerd, hosts, ref string) {
			out, err := c.Ctr("images", "pull", "--hosts-dir", hosts, "--snapshotter", "native", "--platform", "linux/amd64", ref)
			if err != nil {
				t.Fatalf("ctr images pull: %v\n%s", err, out)
			}
			// Unpacked: every layer is a snapshot in the native snapshotter.
			if out := c.MustCtr("snapshots", "--snapshotter", "native", "ls"); len(strings.Split(strings.TrimSpace(out), "\n")) < 2 {
				t.Errorf("no snapshots after the pull, so nothing was unpacked:\n%s", out)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			up := testenv.NewUpstream(t)
			img := up.PushRandomImage("library/chunky", "v1", 3, 3<<20)
			m := testenv.StartMirror(t, testenv.MirrorOptions{
				Upstreams: []string{up.Flag("docker.io")},
				Args:      []string{"--fetch-chunk-size", "64KiB", "--fetch-concurrency", "4"},
			})
			hosts := testenv.HostsDir(t, m.URL, "docker.io")

			c := tc.start(t)
			tc.pull(t, c, hosts, "docker.io/library/chunky:v1")
			requireContent(t, c, img.Digests())

			for i, l := range img.Layers {
				size := int64(len(up.Layer(img, i).Bytes))
				requireRangedFetch(t, up, l, size)
			}
			requireStored(t, m, img.Digests())
		})
	}
}

// requireRangedFetch fails unless the upstream served blob d (of size bytes) only as
// ranges (206), several of them, that together cover the whole blob, each byte once.
func requireRangedFetch(t *testing.T, up *testenv.Upstream, d v1.Hash, size int64) {
	t.Helper()
	type span struct{ from, to int64 } // [from, to)
	var spans []span
	for _, r := range up.Requests() {
		if r.Method != "GET" || !strings.HasSuffix(r.Path, "/blobs/"+d.String()) {
			continue
		}
		var from, last int64
		switch {
		case r.Range == "":
			t.Errorf("layer %s was fetched whole, not by ranges\n%s", d, up.RequestLog())
			return
		case r.Status != 206:
			t.Errorf("layer %s: %s answered %d, want 206\n%s", d, r.Range, r.Status, up.RequestLog())
			return
		}
		if n, _ := fmt.Sscanf(r.Range, "bytes=%d-%d", &from, &last); n == 2 {
			spans = append(spans, span{from, min(last+1, size)})
		} else if n == 1 {
			spans = append(spans, span{from, size})
		} else {
			t.Errorf("layer %s: Range %q", d, r.Range)
			return
		}
	}
	if want := size / rangedChunk; int64(len(spans)) < want/2 || len(spans) < 2 {
		t.Errorf("layer %s (%d bytes, %d-byte chunks) came in %d ranges, want several\n%s", d, size, rangedChunk, len(spans), up.RequestLog())
		return
	}
	t.Logf("layer %s (%d bytes) came in %d ranges", d, size, len(spans))
	slices.SortFunc(spans, func(a, b span) int { return int(a.from - b.from) })
	// Each byte once: one download per digest, however many clients (containerd and the
	// mirror's own eager fetch) asked for the layer.
	var covered int64
	for _, s := range spans {
		if s.from != covered {
			t.Errorf("the ranges fetched for layer %s cover [0, %d) of %d bytes, then start at %d: %v", d, covered, size, s.from, spans)
			return
		}
		covered = s.to
	}
	if covered != size {
		t.Errorf("the ranges fetched for layer %s cover [0, %d) of %d bytes: %v", d, covered, size, spans)
	}
}

// requireStored fails unless every digest in want is in the mirror's content store, and
// every blob there hashes to its name. A blob is committed just after its last byte was
// verified, which may be a moment after the client has it, so this waits a while.
func requireStored(t *testing.T, m *testenv.Mirror, want []v1.Hash) {
	t.Helper()
	dir := filepath.Join(m.DataDir, "content", "blobs", "sha256")
	deadline := time.Now().Add(30 * time.Second)
	for _, d := range want {
		for {
			if _, err := os.Stat(filepath.Join(dir, d.Hex)); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the mirror's store lacks %s", d)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	testenv.StoredBlobs(t, filepath.Join(m.DataDir, "content"))
}
