// Package daemon tests the node-mirror binary as a process: killed mid-download and
// restarted, and reconfigured with SIGHUP while a download streams.
package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	bolt "go.etcd.io/bbolt"

	"github.com/node-mirror/node-mirror/internal/fault"
	"github.com/node-mirror/node-mirror/internal/testenv"
)

func pull(addr, repo string) error {
	ref, err := name.ParseReference(addr+"/"+repo, name.Insecure)
	if err != nil {
		return err
	}
	img, err := remote.Image(ref)
	if err != nil {
		return err
	}
	return validate.Image(img) // reads and checks every blob
}

// checkDataDir asserts what a crash may never break: every blob hashes to its name and
// every index entry (tags, blob metadata) names a blob that is there.
func checkDataDir(t *testing.T, dataDir string) (blobs int) {
	t.Helper()
	have := testenv.StoredBlobs(t, filepath.Join(dataDir, "content"))
	db, err := bolt.Open(filepath.Join(dataDir, "index.db"), 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		if b := tx.Bucket([]byte("tags")); b != nil {
			if err := b.ForEach(func(k, v []byte) error {
				var e struct{ Digest string }
				if err := json.Unmarshal(v, &e); err != nil {
					return err
				}
				if !have[e.Digest] {
					return fmt.Errorf("tag %s points to %s, which is not in the store", k, e.Digest)
				}
				return nil
			}); err != nil {
				return err
			}
		}
		if b := tx.Bucket([]byte("blobs")); b != nil {
			return b.ForEach(func(k, v []byte) error {
				if !have[string(k)] {
					return fmt.Errorf("index records blob %s, which is not in the store", k)
				}
				return nil
			})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return len(have)
}

// TestCrashMidDownloadThenRestart kills the daemon with SIGKILL while many downloads are
// in flight, checks the data dir, restarts on it, and pulls everything.
func TestCrashMidDownloadThenRestart(t *testing.T) {
	faults, up := faultyUpstream(t)
	const images = 8
	for i := 0; i < images; i++ {
		up.PushRandomImage(fmt.Sprintf("library/img%d", i), "v1", 3, 1<<20)
	}
	opts := testenv.MirrorOptions{DataDir: t.TempDir(), Upstreams: []string{up.Flag("docker.io")}, LogLevel: "warn"}
	dataDir := opts.DataDir
	d := testenv.StartMirror(t, opts)

	// Slow blob bodies so the kill lands mid-download.
	faults.Set(fault.Rule{Kind: fault.Trickle, Method: http.MethodGet, PathContains: "/blobs/"})
	var wg sync.WaitGroup
	for c := 0; c < 32; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pull(d.Addr, fmt.Sprintf("library/img%d:v1", c%images)) // fails when killed: expected
		}()
	}
	for faults.Fired(fault.Trickle) < images {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(150 * time.Millisecond)
	d.Kill()
	wg.Wait()
	faults.Clear()

	ingests, _ := os.ReadDir(filepath.Join(dataDir, "content", "ingest"))
	blobs := checkDataDir(t, dataDir)
	t.Logf("after SIGKILL: %d committed blobs, %d ingests left", blobs, len(ingests))
	if len(ingests) == 0 {
		t.Fatal("no download was in flight at the kill; the test proves nothing")
	}

	d = testenv.StartMirror(t, opts)
	for i := 0; i < images; i++ {
		if err := pull(d.Addr, fmt.Sprintf("library/img%d:v1", i)); err != nil {
			t.Fatalf("pull img%d after restart: %v", i, err)
		}
	}
	d.Stop()
	if n := checkDataDir(t, dataDir); n < images*4 {
		t.Fatalf("%d blobs after pulling %d images, want at least %d", n, images, images*4)
	}
}

// TestReloadAddsRegistryWhileDownloadStreams changes the config file, sends SIGHUP, and
// checks the new registry is served while a download started before keeps streaming.
func TestReloadAddsRegistryWhileDownloadStreams(t *testing.T) {
	faultsA, upA := faultyUpstream(t)
	upB := testenv.NewUpstream(t)
	big, err := random.Image(8<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	upA.Push("library/big", "v1", big)
	upB.PushRandomImage("team/app", "v1", 1, 1024)

	cfg := filepath.Join(t.TempDir(), "config.toml")
	write := func(body string) {
		if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(fmt.Sprintf("[[registry]]\nname = \"docker.io\"\nendpoints = [%q]\n", upA.URL()))
	d := testenv.StartMirror(t, testenv.MirrorOptions{LogLevel: "warn", Args: []string{"--config", cfg}})

	layers, _ := big.Layers()
	ld, _ := layers[0].Digest()
	want, _ := io.ReadAll(must(layers[0].Compressed()))
	faultsA.Set(fault.Rule{Kind: fault.Trickle, Method: http.MethodGet, PathContains: ld.String()})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, d.URL+"/v2/library/big/blobs/"+ld.String(), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	first := make([]byte, 1<<20)
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatal(err)
	}

	newRegistry := "/v2/team/app/manifests/v1?ns=ghcr.io"
	if r, err := http.Get(d.URL + newRegistry); err != nil || r.StatusCode != http.StatusNotFound {
		t.Fatalf("before reload ghcr.io should be unknown: %v %v", r, err)
	}
	// A broken config is rejected and the running one stays.
	write("[[registry]\n")
	d.Signal(syscall.SIGHUP)
	waitReloads(t, d, "error", 1)
	if r, err := http.Get(d.URL + "/v2/"); err != nil || r.StatusCode != 200 {
		t.Fatalf("after a broken reload: %v %v", r, err)
	}
	if r, err := http.Get(d.URL + newRegistry); err != nil || r.StatusCode != http.StatusNotFound {
		t.Fatalf("a broken reload changed the registries: %v %v", r, err)
	}

	write(fmt.Sprintf("[[registry]]\nname = \"docker.io\"\nendpoints = [%q]\n\n[[registry]]\nname = \"ghcr.io\"\nendpoints = [%q]\n",
		upA.URL(), upB.URL()))
	d.Signal(syscall.SIGHUP)
	waitReloads(t, d, "ok", 1)
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, err := http.Get(d.URL + newRegistry)
		if err == nil {
			r.Body.Close()
			if r.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the reloaded registry is not served")
		}
		time.Sleep(50 * time.Millisecond)
	}
	rest, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("in-flight download broke across the reload: %v", err)
	}
	if !bytes.Equal(append(first, rest...), want) {
		t.Fatal("in-flight download delivered wrong bytes")
	}
	d.Stop()
}

// waitReloads polls the daemon's reload counter until it shows want reloads with result.
func waitReloads(t *testing.T, d *testenv.Mirror, result string, want float64) {
	t.Helper()
	prefix := `node_mirror_config_reloads_total{result="` + result + `"} `
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := 0.0
		if resp, err := http.Get(d.URL + "/metrics"); err == nil {
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				if v, ok := strings.CutPrefix(sc.Text(), prefix); ok {
					got, _ = strconv.ParseFloat(v, 64)
				}
			}
			resp.Body.Close()
		}
		if got >= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s reloads: %v, want %v", result, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPrefetchExitStatus: the prefetch command exits 0 when every blob landed and 1
// when the daemon passed them through uncached (--max-size 1).
func TestPrefetchExitStatus(t *testing.T) {
	up := testenv.NewUpstream(t)
	up.PushRandomImage("library/app", "v1", 2, 64<<10)
	for _, tc := range []struct {
		name string
		args []string
		code int
	}{
		{"stores", nil, 0},
		{"passes through", []string{"--max-size", "1"}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := testenv.StartMirror(t, testenv.MirrorOptions{Upstreams: []string{up.Flag("docker.io")}, LogLevel: "warn", Args: tc.args})
			out, err := exec.Command(testenv.Bin(t), "prefetch", "--mirror-url", d.URL, "docker.io/library/app:v1").CombinedOutput()
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tc.code {
				t.Fatalf("prefetch exited %d, want %d:\n%s", code, tc.code, out)
			}
			if tc.code != 0 && !strings.Contains(string(out), "not stored") {
				t.Fatalf("prefetch does not say what went wrong:\n%s", out)
			}
		})
	}
}

// faultyUpstream is a test upstream with a fault injector in front of its registry.
func faultyUpstream(t *testing.T) (*fault.Injector, *testenv.Upstream) {
	var in *fault.Injector
	up := testenv.NewUpstream(t, testenv.WithMiddleware(func(h http.Handler) http.Handler {
		in = fault.New(h)
		return in
	}))
	t.Cleanup(in.Close)
	return in, up
}

func must(rc io.ReadCloser, err error) io.ReadCloser {
	if err != nil {
		panic(err)
	}
	return rc
}
