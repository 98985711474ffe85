package e2e

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// The engine tests (Docker, CRI, Podman) share one shape: a scratch root seeded with the
// engine's files as Debian ships them, `node-mirror install --root` pointing the engine at
// a mirror of a test upstream registered as docker.io, a pull that must go through the
// mirror, a re-pull from the mirror's cache with the upstream stopped, and `uninstall`
// giving the scratch root back as it was. The machine has no internet, and the engines
// only know docker.io, so nothing but the mirror can serve their pulls.

// scratchHost is the --root of install and uninstall.
type scratchHost struct {
	t      *testing.T
	bin    string
	Root   string
	before []string
}

// newScratchHost makes a root holding files (path below the root → content; a path
// ending in / is an empty directory).
func newScratchHost(t *testing.T, files map[string]string) *scratchHost {
	t.Helper()
	h := &scratchHost{t: t, bin: testenv.Bin(t), Root: filepath.Join(t.TempDir(), "root")}
	for p, content := range files {
		full := filepath.Join(h.Root, p)
		if strings.HasSuffix(p, "/") {
			if err := os.MkdirAll(full, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		installWrite(t, full, content)
	}
	return h
}

// fixtureFiles reads the tree below dir as newScratchHost's files.
func fixtureFiles(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		files[rel] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// Path is p below the root.
func (h *scratchHost) Path(p string) string { return filepath.Join(h.Root, p) }

// Snapshot records the tree that uninstall must give back.
func (h *scratchHost) Snapshot() { h.before = installSnapshot(h.t, h.Root) }

// Install runs `node-mirror install --root` for engine, pointing docker.io at mirrorURL.
func (h *scratchHost) Install(mirrorURL, engine string) {
	h.t.Helper()
	out := installRun(h.t, h.bin, "install", "--root", h.Root, "--mirror-url", mirrorURL,
		"--registries", "docker.io", "--engines", engine)
	h.t.Logf("install:\n%s", out)
}

// Uninstall runs `node-mirror uninstall --root`.
func (h *scratchHost) Uninstall() {
	h.t.Helper()
	h.t.Logf("uninstall:\n%s", installRun(h.t, h.bin, "uninstall", "--root", h.Root))
}

// RequireRestored fails unless the tree is byte for byte what Snapshot recorded. allow,
// when not nil, may accept a difference: it gets the path and both snapshot lines ("" for
// a path only one side has).
func (h *scratchHost) RequireRestored(allow func(path, before, after string) bool) {
	h.t.Helper()
	if h.before == nil {
		h.t.Fatal("RequireRestored without Snapshot")
	}
	lines := func(snap []string) map[string]string {
		m := map[string]string{}
		for _, l := range snap {
			p, _, _ := strings.Cut(l, " ")
			m[p] = l
		}
		return m
	}
	before, after := lines(h.before), lines(installSnapshot(h.t, h.Root))
	var diffs []string
	for p := range union(before, after) {
		b, a := before[p], after[p]
		if b == a || (allow != nil && allow(p, b, a)) {
			continue
		}
		diffs = append(diffs, "before: "+orNone(b)+"\n after: "+orNone(a))
	}
	if len(diffs) > 0 {
		h.t.Errorf("uninstall did not restore %s:\n%s", h.Root, strings.Join(diffs, "\n"))
	}
}

func union(a, b map[string]string) map[string]bool {
	u := map[string]bool{}
	for k := range a {
		u[k] = true
	}
	for k := range b {
		u[k] = true
	}
	return u
}

func orNone(s string) string {
	if s == "" {
		return "(absent)"
	}
	return s
}

// pullWatch is what the mirror and the upstream had seen before a pull, to tell what the
// pull made them do.
type pullWatch struct {
	m      *testenv.Mirror
	up     *testenv.Upstream
	before testenv.Metrics
	reqs   int
}

func watchPull(t *testing.T, m *testenv.Mirror, up *testenv.Upstream) *pullWatch {
	t.Helper()
	return &pullWatch{m: m, up: up, before: m.Metrics(t), reqs: len(up.Requests())}
}

// delta is how much the mirror's counter name (labels as for Metrics.Sum) grew.
func (w *pullWatch) delta(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	return w.m.Metrics(t).Sum(name, labels...) - w.before.Sum(name, labels...)
}

// RequireCold checks a pull of an image the mirror did not have: the engine asked the
// mirror for the manifest and for every blob, the mirror fetched each blob from upstream
// exactly once and stored it with the manifests, and every request that reached the
// upstream was the mirror's.
func (w *pullWatch) RequireCold(t *testing.T, engine string, manifests, blobs []v1.Hash) {
	t.Helper()
	if n := w.delta(t, "node_mirror_requests_total", "registry=docker.io", "kind=manifest"); n < 1 {
		t.Errorf("%s: the mirror answered %v manifest requests for docker.io during the pull, want at least 1", engine, n)
	}
	if n := w.delta(t, "node_mirror_requests_total", "registry=docker.io", "kind=blob"); n < float64(len(blobs)) {
		t.Errorf("%s: the mirror answered %v blob requests for docker.io during the pull, want at least %d (one per blob)", engine, n, len(blobs))
	}
	reqs := w.up.Requests()[w.reqs:]
	if len(reqs) == 0 {
		t.Errorf("%s: the upstream received no request during a cold pull", engine)
	}
	for _, r := range reqs {
		if !strings.HasPrefix(r.UserAgent, "node-mirror/") {
			t.Errorf("%s: the upstream got %s %s from %q, not from the mirror: the engine went around it", engine, r.Method, r.Path, r.UserAgent)
		}
	}
	requireOneDownloadEach(t, w.up, blobs)
	installHaveBlobs(t, w.m.DataDir, append(append([]v1.Hash(nil), manifests...), blobs...), engine)
}

// RequireFromCache checks a pull made with the upstream stopped: the mirror answered the
// manifest and every blob from its store.
func (w *pullWatch) RequireFromCache(t *testing.T, engine string, blobs []v1.Hash) {
	t.Helper()
	manifests := w.delta(t, "node_mirror_requests_total", "registry=docker.io", "kind=manifest", "result=hit") +
		w.delta(t, "node_mirror_requests_total", "registry=docker.io", "kind=manifest", "result=stale")
	if manifests < 1 {
		t.Errorf("%s: the mirror served no manifest from its cache with the upstream stopped", engine)
	}
	if n := w.delta(t, "node_mirror_requests_total", "registry=docker.io", "kind=blob", "result=hit"); n < float64(len(blobs)) {
		t.Errorf("%s: the mirror served %v blobs from its cache with the upstream stopped, want at least %d (one per blob)", engine, n, len(blobs))
	}
	if n := len(w.up.Requests()); n != w.reqs {
		t.Errorf("%s: the upstream logged %d requests while it was stopped", engine, n-w.reqs)
	}
}

// eventually polls cond every 100 ms until it is true or timeout passed; it reports
// whether cond became true.
func eventually(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
}
