package mirror

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"go.uber.org/goleak"

	"github.com/node-mirror/node-mirror/internal/fault"
	"github.com/node-mirror/node-mirror/internal/testenv"
)

// TestSoak runs 64 clients pulling a mix of cached and cold images while the upstream
// flaps between healthy and failing in every way internal/fault knows. It ends with zero
// wrong bytes, zero 5xx for cached content, no leaked goroutines and the heap back near
// where it started. NODE_MIRROR_SOAK sets the duration (default 10s; CI runs 2m).
func TestSoak(t *testing.T) {
	dur := 10 * time.Second
	if v := os.Getenv("NODE_MIRROR_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("NODE_MIRROR_SOAK: %v", err)
		}
		dur = d
	}
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())

	up := newUpstream(t)
	const images = 16
	imgs := make([]v1.Image, images)
	for i := range imgs {
		imgs[i] = randomImage(t, int64(32<<10+i*8<<10), 3)
		up.Push(fmt.Sprintf("library/img%d", i), "v1", imgs[i])
	}
	tm := newMirrorWith(t, t.TempDir(), map[string][]string{"docker.io": {up.URL()}}, faultClient, func(o *Options) { o.TagFreshness = 0 })
	// Runs before goleak's check (deferred first), also when an assertion fails.
	defer func() {
		tm.srv.Close()
		tm.Close()
		up.Faults.Close()
		up.Stop()
	}()
	// Half the images are cached before the storm.
	cached := map[int]bool{}
	for i := 0; i < images/2; i++ {
		tm.pull(t, fmt.Sprintf("library/img%d:v1", i))
		cached[i] = true
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)

	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	faults := []fault.Rule{
		{Kind: fault.Status, Status: 503, RetryAfter: "1"},
		{Kind: fault.Status, Status: 429},
		{Kind: fault.Reset},
		{Kind: fault.FlipByte, Method: http.MethodGet},
		{Kind: fault.Truncate, Method: http.MethodGet},
		{Kind: fault.StallAfterHeaders, Method: http.MethodGet},
		{Kind: fault.StallBeforeHeaders},
	}
	var flaps sync.WaitGroup
	flaps.Add(1)
	go func() {
		defer flaps.Done()
		for ctx.Err() == nil {
			if rand.IntN(2) == 0 {
				up.Faults.Clear()
			} else {
				up.Faults.Set(faults[rand.IntN(len(faults))])
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Duration(100+rand.IntN(400)) * time.Millisecond):
			}
		}
		up.Faults.Clear()
	}()

	// New images keep arriving upstream (pushed past the fault injector), so cold pulls
	// go on for the whole run instead of ending once the first images are cached.
	var imgMu sync.Mutex
	flaps.Add(1)
	go func() {
		defer flaps.Done()
		for n := images; ctx.Err() == nil; n++ {
			img, err := random.Image(48<<10, 3)
			if err != nil {
				t.Error(err)
				return
			}
			pushTo(t, up, fmt.Sprintf("library/img%d", n), img)
			imgMu.Lock()
			imgs = append(imgs, img)
			imgMu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()

	var wrong, cached5xx, ok, failed atomic.Int64
	var wg sync.WaitGroup
	for c := 0; c < 64; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				imgMu.Lock()
				i := rand.IntN(len(imgs))
				img := imgs[i]
				imgMu.Unlock()
				res := soakPull(ctx, client, tm.srv.URL, i, img)
				switch {
				case res.wrongBytes:
					wrong.Add(1)
				case res.fiveXX && cached[i]:
					cached5xx.Add(1)
					t.Errorf("img%d is cached but got %s", i, res.detail)
				case res.ok:
					ok.Add(1)
				default:
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	flaps.Wait()
	t.Logf("soak %v: %d images, %d complete pulls, %d failed pulls (cold content, faulty upstream), %d faults fired",
		dur, len(imgs), ok.Load(), failed.Load(), totalFired(up.Faults))
	if wrong.Load() != 0 || cached5xx.Load() != 0 {
		t.Fatalf("%d pulls saw wrong bytes, %d 5xx answers for cached content", wrong.Load(), cached5xx.Load())
	}
	if ok.Load() == 0 {
		t.Fatal("no pull completed; the soak proves nothing")
	}
	assertStoreIntact(t, tm)

	// Memory: the heap returns near its baseline once the clients are gone.
	client.CloseIdleConnections()
	up.Faults.Close()
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapInuse) - int64(base.HeapInuse)
	t.Logf("heap in use: %d MiB at baseline, %d MiB after", base.HeapInuse>>20, after.HeapInuse>>20)
	if grew > 32<<20 {
		t.Fatalf("heap %d MiB above baseline after the soak", grew>>20)
	}
}

// pushTo pushes from a goroutine of the test's own, where up.Push, which ends the test
// on an error, may not be called.
func pushTo(t *testing.T, up *testenv.Upstream, repo string, img v1.Image) {
	if err := remote.Write(up.Ref(repo+":v1"), img, up.RemoteOptions()...); err != nil {
		t.Errorf("pushing %s: %v", repo, err)
	}
}

type soakResult struct {
	ok, wrongBytes, fiveXX bool
	detail                 string
}

// soakPull resolves img by tag and fetches every layer, checking each complete answer.
func soakPull(ctx context.Context, c *http.Client, base string, i int, img v1.Image) soakResult {
	repo := fmt.Sprintf("/v2/library/img%d", i)
	status, body, err := soakGet(ctx, c, base+repo+"/manifests/v1")
	if err != nil || status != 200 {
		return soakResult{fiveXX: status >= 500, detail: fmt.Sprintf("manifest: %d %v", status, err)}
	}
	want, _ := img.Digest()
	if sha(body) != want.Hex {
		return soakResult{wrongBytes: true}
	}
	var mf struct {
		Layers []struct {
			Digest string `json:"digest"`
		} `json:"layers"`
	}
	if json.Unmarshal(body, &mf) != nil {
		return soakResult{wrongBytes: true}
	}
	for _, l := range mf.Layers {
		status, body, err := soakGet(ctx, c, base+repo+"/blobs/"+l.Digest)
		if err != nil || status != 200 {
			return soakResult{fiveXX: status >= 500, detail: fmt.Sprintf("blob: %d %v", status, err)}
		}
		if "sha256:"+sha(body) != l.Digest {
			return soakResult{wrongBytes: true}
		}
	}
	return soakResult{ok: true}
}

// soakGet returns an error unless the body arrived complete.
func soakGet(ctx context.Context, c *http.Client, url string) (int, []byte, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func totalFired(in *fault.Injector) int {
	n := 0
	for _, k := range []fault.Kind{fault.Status, fault.Reset, fault.FlipByte, fault.Truncate, fault.StallAfterHeaders, fault.StallBeforeHeaders} {
		n += in.Fired(k)
	}
	return n
}
