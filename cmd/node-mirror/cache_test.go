package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	"github.com/opencontainers/go-digest"
	"github.com/urfave/cli/v2"

	"github.com/node-mirror/node-mirror/internal/testenv"
	"github.com/node-mirror/node-mirror/pkg/admin"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/mirror"
	"github.com/node-mirror/node-mirror/pkg/server"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// run runs the CLI in-process and returns what it printed.
func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	app := newApp()
	app.Writer = &out
	app.ErrWriter = &out
	app.ExitErrHandler = func(*cli.Context, error) {} // report, do not os.Exit
	err := app.Run(append([]string{"node-mirror"}, args...))
	return out.String(), err
}

// fillStore puts n blobs of size bytes into a data dir, oldest first.
func fillStore(t *testing.T, dir string, n, size int) []digest.Digest {
	t.Helper()
	s, err := contentstore.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var ds []digest.Digest
	for range n {
		b := make([]byte, size)
		rand.Read(b)
		d := digest.FromBytes(b)
		if err := s.PutBlob(context.Background(), d, b); err != nil {
			t.Fatal(err)
		}
		s.RecordBlob(d, "", int64(size), "docker.io/library/app")
		ds = append(ds, d)
	}
	return ds
}

func storeDigests(t *testing.T, dir string) []digest.Digest {
	t.Helper()
	entries, _ := os.ReadDir(filepath.Join(dir, "content", "blobs", "sha256"))
	var out []digest.Digest
	for _, e := range entries {
		out = append(out, digest.NewDigestFromEncoded(digest.SHA256, e.Name()))
	}
	slices.Sort(out)
	return out
}

func gcReport(t *testing.T, args ...string) contentstore.GCReport {
	t.Helper()
	out, err := run(t, append([]string{"gc", "--json"}, args...)...)
	if err != nil {
		t.Fatalf("gc %v: %v\n%s", args, err, out)
	}
	var rep contentstore.GCReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("gc output: %v\n%s", err, out)
	}
	return rep
}

func evictedSet(rep contentstore.GCReport) []digest.Digest {
	var out []digest.Digest
	for _, e := range rep.Evicted {
		out = append(out, e.Digest)
	}
	slices.Sort(out)
	return out
}

// checkGCFreesWhatItSaid: a dry run changes nothing; the collection after it removes
// exactly what the dry run listed, and the bytes it reports.
func checkGCFreesWhatItSaid(t *testing.T, dir string, args ...string) {
	t.Helper()
	before := storeDigests(t, dir)
	dry := gcReport(t, append(args, "--dry-run")...)
	if !slices.Equal(storeDigests(t, dir), before) {
		t.Fatal("gc --dry-run changed the store")
	}
	if len(dry.Evicted) == 0 {
		t.Fatal("nothing to collect; the test proves nothing")
	}
	rep := gcReport(t, args...)
	if !slices.Equal(evictedSet(rep), evictedSet(dry)) || rep.FreedBytes != dry.FreedBytes || rep.UsageAfter != dry.UsageAfter {
		t.Fatalf("gc freed %v (%d bytes), its dry run said %v (%d bytes)", evictedSet(rep), rep.FreedBytes, evictedSet(dry), dry.FreedBytes)
	}
	after := storeDigests(t, dir)
	want := slices.DeleteFunc(slices.Clone(before), func(d digest.Digest) bool { return slices.Contains(evictedSet(dry), d) })
	if !slices.Equal(after, want) {
		t.Fatalf("store after gc %v, want %v", after, want)
	}
	if rep.UsageBefore-rep.UsageAfter != rep.FreedBytes {
		t.Fatalf("usage %d -> %d does not match %d freed", rep.UsageBefore, rep.UsageAfter, rep.FreedBytes)
	}
}

func TestGCOfflineDryRunThenGC(t *testing.T) {
	dir := t.TempDir()
	fillStore(t, dir, 10, 1000)
	checkGCFreesWhatItSaid(t, dir, "--data-dir", dir, "--max-size", "5000")
	if out, err := run(t, "gc", "--data-dir", dir, "--max-size", "5000"); err != nil || !strings.Contains(out, "freed") {
		t.Fatalf("human gc output: %v\n%s", err, out)
	}
	out, err := run(t, "status", "--data-dir", dir, "--max-size", "5000")
	if err != nil || !strings.Contains(out, "budget") || !strings.Contains(out, "docker.io/library/app") {
		t.Fatalf("status: %v\n%s", err, out)
	}
}

// daemon is a mirror with the admin API behind the real server handler.
type testDaemon struct {
	url   string
	up    *testenv.Upstream
	store *contentstore.Store
	dir   string
}

func startDaemon(t *testing.T, budget contentstore.Budget) *testDaemon {
	t.Helper()
	up := testenv.NewUpstream(t)
	dir := t.TempDir()
	store, err := contentstore.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	store.SetBudget(budget)
	cl, err := upstream.New("docker.io", []string{up.URL()}, "", "", upstream.Options{})
	if err != nil {
		t.Fatal(err)
	}
	m, err := mirror.New(mirror.Options{Store: store, Registries: map[string]*upstream.Client{"docker.io": cl},
		DefaultRegistry: "docker.io", Logger: quiet(), EagerFetch: -1})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(server.New(server.Options{Mirror: m, Admin: admin.Handler(m, nil, nil), Logger: quiet()}).Handler())
	t.Cleanup(func() {
		srv.Close()
		m.Close()
	})
	return &testDaemon{url: srv.URL, up: up, store: store, dir: dir}
}

func TestGCAndStatusThroughDaemon(t *testing.T) {
	d := startDaemon(t, contentstore.Budget{})
	ctx := context.Background()
	for range 10 {
		b := make([]byte, 1000)
		rand.Read(b)
		d.store.PutBlob(ctx, digest.FromBytes(b), b)
	}
	// The daemon owns the data dir: offline gc refuses and says what to do instead.
	if out, err := run(t, "gc", "--data-dir", d.dir); err == nil || !strings.Contains(err.Error()+out, "--mirror-url") {
		t.Fatalf("offline gc on a served data dir: %v\n%s", err, out)
	}
	d.store.SetBudget(contentstore.Budget{MaxBytes: 4000})
	checkGCFreesWhatItSaid(t, d.dir, "--mirror-url", d.url)

	out, err := run(t, "status", "--json", "--mirror-url", d.url)
	var st admin.Status
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || st.Source != "daemon" || st.Mirror == nil || st.Store.MaxBytes != 4000 || st.Store.Bytes > 4000 {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if out, err := run(t, "status", "--mirror-url", d.url); err != nil || !strings.Contains(out, "hit ratio") {
		t.Fatalf("status: %v\n%s", err, out)
	}
}

// TestPrefetchThenUpstreamGone: prefetch one platform of an index through the daemon,
// stop the upstream, and the image still pulls, from cache. A missing image fails the
// command.
func TestPrefetchThenUpstreamGone(t *testing.T) {
	d := startDaemon(t, contentstore.Budget{})
	amd, _ := random.Image(64<<10, 2)
	arm, _ := random.Image(64<<10, 2)
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
	)
	d.up.PushIndex("library/app", "v1", idx)
	list := filepath.Join(t.TempDir(), "images")
	os.WriteFile(list, []byte("# warm these\ndocker.io/library/app:v1\n"), 0o644)

	out, err := run(t, "prefetch", "--mirror-url", d.url, "--platform", "linux/arm64", "--from-file", list)
	if err != nil {
		t.Fatalf("prefetch: %v\n%s", err, out)
	}
	if !strings.Contains(out, "3 fetched") || strings.Contains(out, "[") {
		t.Fatalf("prefetch output (plain lines, 3 blobs of the arm64 image):\n%s", out)
	}
	amdLayers, _ := amd.Layers()
	al, _ := amdLayers[0].Digest()
	if _, err := d.store.Size(digest.Digest(al.String())); err == nil {
		t.Fatal("the other platform was prefetched")
	}

	d.up.Stop()
	ad, _ := arm.Digest()
	mref, _ := name.ParseReference(strings.TrimPrefix(d.url, "http://")+"/library/app@"+ad.String(), name.Insecure)
	img, err := remote.Image(mref)
	if err != nil {
		t.Fatalf("pull with the upstream gone: %v", err)
	}
	if err := validate.Image(img); err != nil {
		t.Fatalf("pull with the upstream gone: %v", err)
	}

	if out, err := run(t, "prefetch", "--mirror-url", d.url, "library/missing:v1"); err == nil {
		t.Fatalf("prefetch of a missing image succeeded:\n%s", out)
	}
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestPrefetchExitsNonZeroOnPassThrough: a daemon that cannot store (a one-byte budget,
// as --max-size 1) serves every blob by pass-through; prefetch must exit 1 and say so.
func TestPrefetchExitsNonZeroOnPassThrough(t *testing.T) {
	d := startDaemon(t, contentstore.Budget{MaxBytes: 1})
	d.up.PushRandomImage("library/app", "v1", 2, 16<<10)
	out, err := run(t, "prefetch", "--mirror-url", d.url, "library/app:v1")
	var ec cli.ExitCoder
	if !errors.As(err, &ec) || ec.ExitCode() != 1 || !strings.Contains(err.Error(), "not stored") {
		t.Fatalf("prefetch through a daemon that stores nothing: %v\n%s", err, out)
	}
}
