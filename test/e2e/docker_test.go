package e2e

import (
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// TestDockerPullsThroughInstalledMirror: Debian's dockerd 20.10, running before install as
// it would on a host, is pointed at the mirror by `node-mirror install --root` (its
// daemon.json registry-mirrors, which only ever applies to docker.io) and picks that up on
// SIGHUP. `docker pull` then goes through the mirror; with the image removed and the
// upstream stopped, it pulls again from the mirror's cache. After `uninstall` and another
// SIGHUP, dockerd must no longer use the mirror, and the scratch root must be as before.
func TestDockerPullsThroughInstalledMirror(t *testing.T) {
	t.Parallel()
	up := testenv.NewUpstream(t)
	img := up.PushRandomImage("library/dockerapp", "v1", 3, 256<<10)
	m := mirrorOf(t, up)
	// Debian's docker.io ships /etc/docker empty: no daemon.json.
	h := newScratchHost(t, map[string]string{"etc/docker/": ""})

	dk := testenv.StartDockerd(t, h.Path("etc/docker"))
	if got, err := dk.Mirrors(); err != nil || len(got) != 0 {
		t.Fatalf("dockerd has mirrors %v (%v) before install", got, err)
	}
	// dockerd writes its key.json into /etc/docker when it starts; what uninstall must give
	// back is the tree as it was just before install.
	h.Snapshot()
	h.Install(m.URL, "docker")
	dk.Reload()
	if !eventually(time.Minute, func() bool { return dockerUsesMirror(t, dk, m.URL) }) {
		t.Fatalf("dockerd does not list %s in registry-mirrors after install and SIGHUP", m.URL)
	}

	const ref = "docker.io/library/dockerapp:v1"
	w := watchPull(t, m, up)
	t.Logf("docker pull:\n%s", dk.MustDocker("pull", ref))
	dockerRequireDigest(t, dk, ref, img.Digest.String())
	w.RequireCold(t, "docker pull", []v1.Hash{img.Digest}, img.Blobs())

	dk.MustDocker("rmi", ref)
	if out, err := dk.Docker("image", "inspect", ref); err == nil {
		t.Fatalf("%s is still there after docker rmi:\n%s", ref, out)
	}
	up.Stop()
	w = watchPull(t, m, up)
	t.Logf("docker pull, upstream stopped:\n%s", dk.MustDocker("pull", ref))
	dockerRequireDigest(t, dk, ref, img.Digest.String())
	w.RequireFromCache(t, "docker pull", img.Blobs())

	h.Uninstall()
	dk.Reload()
	// Issue 11, item 6: when daemon.json did not exist before install, a reload after
	// uninstall must still take the mirror away (uninstall leaves "registry-mirrors": []).
	if !eventually(30*time.Second, func() bool { return !dockerUsesMirror(t, dk, m.URL) }) {
		got, _ := dk.Mirrors()
		t.Errorf("dockerd still lists registry-mirrors %v after uninstall and SIGHUP, so it keeps pulling through the mirror", got)
	}
	h.RequireRestored(emptyMirrorsDaemonJSON)
}

// emptyMirrorsDaemonJSON accepts the one trace uninstall may leave of a Docker install:
// a daemon.json that did not exist before, saying "no mirrors", because dockerd keeps its
// mirrors on reload when the file or the key is merely gone (issue 11, item 6).
func emptyMirrorsDaemonJSON(path, before, after string) bool {
	if path != "/etc/docker/daemon.json" || before != "" || after == "" {
		return false
	}
	// A snapshot line is "path mode quoted-content".
	_, rest, _ := strings.Cut(after, " ")
	mode, quoted, _ := strings.Cut(rest, " ")
	if !strings.HasPrefix(mode, "-") {
		return false
	}
	var content string
	if err := json.Unmarshal([]byte(quoted), &content); err != nil {
		return false
	}
	var doc map[string]any
	if err := json.Unmarshal([]byte(content), &doc); err != nil {
		return false
	}
	return reflect.DeepEqual(doc, map[string]any{"registry-mirrors": []any{}})
}

// dockerUsesMirror tells whether `docker info` lists mirrorURL among registry-mirrors
// (dockerd writes them with a trailing slash).
func dockerUsesMirror(t *testing.T, dk *testenv.Dockerd, mirrorURL string) bool {
	got, err := dk.Mirrors()
	if err != nil {
		t.Logf("docker info: %v", err)
		return false
	}
	return slices.ContainsFunc(got, func(s string) bool { return strings.TrimSuffix(s, "/") == mirrorURL })
}

// dockerRequireDigest fails unless dockerd has ref, pulled as the manifest digest want.
func dockerRequireDigest(t *testing.T, dk *testenv.Dockerd, ref, want string) {
	t.Helper()
	out := dk.MustDocker("image", "inspect", "--format", "{{json .RepoDigests}}", ref)
	var digests []string
	if err := json.Unmarshal([]byte(out), &digests); err != nil {
		t.Fatalf("docker image inspect %s: %q: %v", ref, out, err)
	}
	// Docker names docker.io/library/x as x.
	short := func(s string) string { return strings.TrimPrefix(strings.TrimPrefix(s, "docker.io/"), "library/") }
	repo, _, _ := strings.Cut(short(ref), ":")
	for _, d := range digests {
		if short(d) == repo+"@"+want {
			return
		}
	}
	t.Fatalf("docker has %s as %v, want digest %s", ref, digests, want)
}
