package daemon

import (
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// serveBlobs starts a registry of synthetic blobs on loopback.
func serveBlobs(t *testing.T, blobs ...*testenv.SyntheticBlob) (*testenv.BlobServer, string) {
	t.Helper()
	bs := testenv.NewBlobServer(blobs...)
	srv := httptest.NewServer(bs)
	t.Cleanup(srv.Close)
	return bs, srv.URL
}

// getDigest GETs url and returns the digest and length of the body.
func getDigest(t *testing.T, url string) (digest.Digest, int64) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	if err != nil {
		t.Fatalf("GET %s: after %d bytes: %v", url, n, err)
	}
	return digest.NewDigest(digest.SHA256, h), n
}

// TestColdRangedFetchMemory (issue 12): a cold 1 GiB blob fetched by ranges over several
// connections arrives whole and right, each byte fetched about once, and the daemon's
// peak RSS stays under 64 MiB: chunks wait on disk, not in memory.
func TestColdRangedFetchMemory(t *testing.T) {
	bin := os.Getenv(plainBinEnv)
	if bin == "" {
		t.Fatalf("%s is not set: run `make e2e`, or `make build && %s=$PWD/bin/node-mirror go test ./test/daemon/`", plainBinEnv, plainBinEnv)
	}
	t.Setenv(testenv.BinEnv, bin)
	blob := testenv.NewSyntheticBlob(1<<30, 1)
	bs, url := serveBlobs(t, blob)
	m := testenv.StartMirror(t, testenv.MirrorOptions{Upstreams: []string{"docker.io=" + url}, LogLevel: "warn"})

	start := time.Now()
	got, n := getDigest(t, m.URL+"/v2/library/big/blobs/"+blob.Digest.String())
	t.Logf("1 GiB cold in %v over up to %d connections; %d upstream requests", time.Since(start), bs.Peak(), len(bs.Requests()))
	if got != blob.Digest || n != blob.Size {
		t.Fatalf("got %d bytes with digest %s, want %s", n, got, blob.Digest)
	}
	if bs.Peak() < 2 {
		t.Errorf("%d connection(s) at once: the blob was not fetched in ranges", bs.Peak())
	}
	if sent := bs.Sent(); float64(sent) > 1.05*float64(blob.Size) {
		t.Errorf("upstream sent %d bytes for a %d-byte blob", sent, blob.Size)
	}
	peak := peakRSS(t, m.PID())
	t.Logf("peak RSS %d MiB", peak>>20)
	if peak >= 64<<20 {
		t.Fatalf("the daemon's peak RSS reached %d MiB during a cold 1 GiB fetch, want under 64 MiB", peak>>20)
	}
	// Served from disk afterwards, right.
	if got, _ := getDigest(t, m.URL+"/v2/library/big/blobs/"+blob.Digest.String()); got != blob.Digest {
		t.Fatalf("warm: digest %s", got)
	}
}

// TestCrashMidRangedFetchResumes (issue 12): SIGKILL while chunks are in flight leaves the
// ingest holding the contiguous prefix only (chunks fetched ahead lived in nameless files,
// gone with the process); the restarted daemon resumes from there with a range request and
// serves the right blob.
func TestCrashMidRangedFetchResumes(t *testing.T) {
	blob := testenv.NewSyntheticBlob(80<<20, 2)
	bs, url := serveBlobs(t, blob)
	bs.PerConnRate.Store(6 << 20)
	dataDir := t.TempDir()
	opts := testenv.MirrorOptions{Upstreams: []string{"docker.io=" + url}, DataDir: dataDir, LogLevel: "warn"}
	m := testenv.StartMirror(t, opts)
	go http.Get(m.URL + "/v2/library/big/blobs/" + blob.Digest.String())

	ingest := filepath.Join(dataDir, "content", "ingest", digest.FromString("node-mirror-"+blob.Digest.String()).Encoded(), "data")
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if fi, err := os.Stat(ingest); err == nil && fi.Size() >= 8<<20 && bs.Peak() >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the download did not get going with several connections (peak %d)", bs.Peak())
		}
	}
	m.Kill()
	fi, err := os.Stat(ingest)
	if err != nil {
		t.Fatalf("no ingest after SIGKILL: %v", err)
	}
	left := fi.Size()
	if left == 0 || left >= blob.Size {
		t.Fatalf("ingest of %d bytes after SIGKILL, want a part", left)
	}
	onDisk, err := os.ReadFile(ingest)
	if err != nil {
		t.Fatal(err)
	}
	if string(onDisk) != string(blob.Bytes(0, left)) {
		t.Fatal("the ingest left by the crash is not the blob's prefix")
	}
	if scratch, _ := os.ReadDir(filepath.Join(dataDir, "scratch")); len(scratch) != 0 {
		t.Fatalf("chunk files outlived the process: %d", len(scratch))
	}

	before := len(bs.Requests())
	bs.PerConnRate.Store(0)
	m = testenv.StartMirror(t, opts)
	got, n := getDigest(t, m.URL+"/v2/library/big/blobs/"+blob.Digest.String())
	if got != blob.Digest || n != blob.Size {
		t.Fatalf("after restart: %d bytes, digest %s", n, got)
	}
	reqs := bs.Requests()[before:]
	if len(reqs) == 0 || !strings.HasPrefix(reqs[0], fmt.Sprintf("bytes=%d-", left)) {
		t.Fatalf("first request after the restart had Range %q, want one from the ingest's end %d", reqs, left)
	}
}
