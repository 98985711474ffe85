package e2e

import (
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// TestPodmanPullsThroughInstalledMirror: Debian's podman 4.3 with /etc/containers as
// Debian ships it plus the registries.conf.d drop-in `node-mirror install --root` wrote
// pulls docker.io/library/x through the mirror (the drop-in names it as
// 127.0.0.1:PORT/docker.io and marks it insecure, so no --tls-verify is given), and again
// from the mirror's cache after `podman rmi` with the upstream stopped. Then uninstall
// gives the scratch root back as it was.
func TestPodmanPullsThroughInstalledMirror(t *testing.T) {
	t.Parallel()
	up := testenv.NewUpstream(t)
	img := up.PushRandomImage("library/podapp", "v1", 3, 256<<10)
	m := mirrorOf(t, up)
	h := newScratchHost(t, fixtureFiles(t, "testdata/debian-podman"))
	h.Snapshot()
	h.Install(m.URL, "crio")
	p := testenv.NewPodman(t, h.Path("etc/containers"))

	const ref = "docker.io/library/podapp:v1"
	w := watchPull(t, m, up)
	p.MustPodman("pull", ref)
	podmanRequireDigest(t, p, ref, img.Digest)
	w.RequireCold(t, "podman pull", []v1.Hash{img.Digest}, img.Blobs())

	p.MustPodman("rmi", ref)
	if out, err := p.Podman("image", "exists", ref); err == nil {
		t.Fatalf("%s is still there after podman rmi\n%s", ref, out)
	}
	up.Stop()
	w = watchPull(t, m, up)
	p.MustPodman("pull", ref)
	podmanRequireDigest(t, p, ref, img.Digest)
	w.RequireFromCache(t, "podman pull, upstream stopped", img.Blobs())

	h.Uninstall()
	h.RequireRestored(nil)
}

// podmanRequireDigest fails unless podman has ref, pulled as the manifest digest want.
func podmanRequireDigest(t *testing.T, p *testenv.Podman, ref string, want v1.Hash) {
	t.Helper()
	got := strings.TrimSpace(p.MustPodman("image", "inspect", "--format", "{{.Digest}}", ref))
	if got != want.String() {
		t.Fatalf("podman has %s as %s, want %s", ref, got, want)
	}
}
