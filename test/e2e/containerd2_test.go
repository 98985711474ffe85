package e2e

import (
	"strings"
	"testing"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// TestContainerd2PullsAndUnpacksThroughMirror: containerd 2.x, what new nodes run, pulls
// and unpacks an image with `ctr images pull --hosts-dir`. Its transfer service resolves
// the hosts dir inside the daemon, so this is the path a kubelet's pulls take. Then the
// upstream is stopped and a fresh containerd pulls the same image from the mirror's cache.
func TestContainerd2PullsAndUnpacksThroughMirror(t *testing.T) {
	up := testenv.NewUpstream(t)
	img := up.PushRandomImage("library/app", "v2", 3, 64<<10)
	m := testenv.StartMirror(t, testenv.MirrorOptions{Upstreams: []string{up.Flag("docker.io")}})
	hosts := testenv.HostsDir(t, m.URL, "docker.io")

	for _, round := range []string{"cold", "upstream stopped"} {
		c := testenv.StartContainerd2(t)
		out, err := c.Ctr("images", "pull", "--hosts-dir", hosts, "--snapshotter", "native",
			"--platform", "linux/amd64", "docker.io/library/app:v2")
		if err != nil {
			t.Fatalf("%s: ctr images pull: %v\n%s", round, err, out)
		}
		have := c.Content()
		for _, d := range img.Digests() {
			if !have[d.String()] {
				t.Errorf("%s: containerd lacks %s after the pull", round, d)
			}
		}
		// Unpacked: the image has a snapshot chain in the native snapshotter.
		if out := c.MustCtr("snapshots", "--snapshotter", "native", "ls"); len(strings.Split(strings.TrimSpace(out), "\n")) < 2 {
			t.Errorf("%s: no snapshots after the pull, so nothing was unpacked:\n%s", round, out)
		}
		up.Stop()
	}
	for _, l := range img.Layers {
		if n := up.BlobGETs(l); n != 1 {
			t.Errorf("layer %s fetched %d times from upstream, want 1", l, n)
		}
	}
}
