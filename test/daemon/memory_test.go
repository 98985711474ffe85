package daemon

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// plainBinEnv names a build of the daemon without the race detector, whose shadow memory
// would swamp what this test measures. `make e2e` builds it and sets it.
const plainBinEnv = "NODE_MIRROR_PLAIN_BIN"

// TestHostileClientsMemory (issue 10, "a memory test"): with a 128 MiB layer cached, eight
// parallel requests for it under manifests/ and 400 tags/list requests that each name a
// different page size (upstream answers with 3 MiB) leave the daemon's peak RSS under
// 64 MiB. Before the limits, the first took a daemon to 2.4 GB and the second to 1.16 GB.
func TestHostileClientsMemory(t *testing.T) {
	bin := os.Getenv(plainBinEnv)
	if bin == "" {
		t.Fatalf("%s is not set: run `make e2e`, or `make build && %s=$PWD/bin/node-mirror go test ./test/daemon/`", plainBinEnv, plainBinEnv)
	}
	t.Setenv(testenv.BinEnv, bin)

	bigList := []byte(`{"name":"library/app","tags":["` + strings.Repeat("t", 3<<20) + `"]}`)
	up := testenv.NewUpstream(t, testenv.WithMiddleware(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/tags/list") {
				w.Header().Set("Content-Type", "application/json")
				w.Header().Set("Content-Length", strconv.Itoa(len(bigList)))
				w.Write(bigList)
				return
			}
			next.ServeHTTP(w, r)
		})
	}))
	layer := make([]byte, 128<<20)
	rand.Read(layer)
	ld := up.PushBlob("library/app", layer)
	m := testenv.StartMirror(t, testenv.MirrorOptions{Upstreams: []string{up.Flag("docker.io")}, LogLevel: "warn"})

	resp, err := http.Get(m.URL + "/v2/library/app/blobs/" + ld.String())
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || n != int64(len(layer)) || resp.StatusCode != 200 {
		t.Fatalf("caching the layer: %d, %d bytes, %v", resp.StatusCode, n, err)
	}
	layer = nil
	t.Logf("peak RSS after caching the layer: %d MiB", peakRSS(t, m.PID())>>20)

	run := func(paths []string, method string, parallel int) {
		t.Helper()
		work := make(chan string)
		var wg sync.WaitGroup
		for range parallel {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for p := range work {
					req, _ := http.NewRequest(method, m.URL+p, nil)
					resp, err := http.DefaultClient.Do(req)
					if err != nil {
						t.Errorf("%s %s: %v", method, p, err)
						continue
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}()
		}
		for _, p := range paths {
			work <- p
		}
		close(work)
		wg.Wait()
	}
	var manifests []string
	for range 8 {
		manifests = append(manifests, "/v2/library/app/manifests/"+ld.String())
	}
	run(manifests, http.MethodGet, 8)
	run(manifests, http.MethodHead, 8)
	t.Logf("peak RSS after manifest requests: %d MiB", peakRSS(t, m.PID())>>20)
	var lists []string
	for i := range 400 {
		lists = append(lists, fmt.Sprintf("/v2/library/app/tags/list?n=%d", i+1))
	}
	run(lists, http.MethodGet, 16)

	peak := peakRSS(t, m.PID())
	t.Logf("peak RSS %d MiB", peak>>20)
	if peak >= 64<<20 {
		t.Fatalf("the daemon's peak RSS reached %d MiB, want under 64 MiB", peak>>20)
	}
}

// peakRSS reads VmHWM, the process's peak resident set size, from /proc.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("VmHWM:")); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(string(v)), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc status")
	return 0
}
