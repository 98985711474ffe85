package mirror

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// rangedBlob is an upstream of the test's own for one blob: it answers ranges (or not),
// slowly enough that downloads overlap, and misbehaves on request.
type rangedBlob struct {
	blob []byte
	path string

	mu       sync.Mutex
	inFlight int   // requests being answered now
	peak     int   // most at once
	sent     int64 // body bytes sent
	ranges   []string
	// misbehave, when set, may answer a request itself (return true).
	misbehave func(w http.ResponseWriter, r *http.Request, n int) bool
	noRanges  bool          // answer every request with the whole blob (200)
	pause     time.Duration // after each 32 KiB
}

func newRangedBlob(size int) *rangedBlob {
	b := make([]byte, size)
	rand.Read(b)
	return &rangedBlob{blob: b, path: "/v2/library/app/blobs/" + digest.FromBytes(b).String(), pause: time.Millisecond}
}

func (rb *rangedBlob) digest() digest.Digest { return digest.FromBytes(rb.blob) }

// install makes up answer the blob's path.
func (rb *rangedBlob) install(up *testenv.Upstream) {
	up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == rb.path && r.Method == http.MethodHead {
			w.Header().Set("Content-Length", strconv.Itoa(len(rb.blob)))
			return true
		}
		if r.URL.Path != rb.path || r.Method != http.MethodGet {
			return false
		}
		rb.mu.Lock()
		rb.ranges = append(rb.ranges, r.Header.Get("Range"))
		n := len(rb.ranges)
		rb.inFlight++
		rb.peak = max(rb.peak, rb.inFlight)
		misbehave, noRanges := rb.misbehave, rb.noRanges
		rb.mu.Unlock()
		defer func() {
			rb.mu.Lock()
			rb.inFlight--
			rb.mu.Unlock()
		}()
		if misbehave != nil && misbehave(w, r, n) {
			return true
		}
		start, end := int64(0), int64(len(rb.blob))
		if rg := r.Header.Get("Range"); rg != "" && !noRanges {
			win, ok := requestedWindow(r, int64(len(rb.blob)), "")
			if !ok {
				w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
				return true
			}
			start, end = win.start, win.end
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, end-1, len(rb.blob)))
			w.Header().Set("Content-Length", strconv.FormatInt(end-start, 10))
			w.WriteHeader(http.StatusPartialContent)
		} else {
			w.Header().Set("Content-Length", strconv.Itoa(len(rb.blob)))
			w.WriteHeader(http.StatusOK)
		}
		rb.write(w, r, rb.blob[start:end])
		return true
	})
}

// write sends b in 32 KiB pieces with a pause after each.
func (rb *rangedBlob) write(w http.ResponseWriter, r *http.Request, b []byte) {
	for i := 0; i < len(b); i += 32 << 10 {
		n, err := w.Write(b[i:min(i+32<<10, len(b))])
		rb.mu.Lock()
		rb.sent += int64(n)
		rb.mu.Unlock()
		if err != nil {
			return
		}
		http.NewResponseController(w).Flush()
		select {
		case <-time.After(rb.pause):
		case <-r.Context().Done():
			return
		}
	}
}

func (rb *rangedBlob) stats() (requests, peak int, sent int64) {
	rb.mu.Lock()
	defer rb.mu.Unlock()
	return len(rb.ranges), rb.peak, rb.sent
}

// withChunks sets a small ranged fetch for tests.
func withChunks(concurrency int, chunk int64) mirrorOpt {
	return func(o *Options) {
		o.FetchConcurrency, o.FetchChunkSize, o.EagerFetch = concurrency, chunk, 0
	}
}

// TestRangedFetch: a blob whose upstream answers ranges comes over several connections,
// each byte once, right, to 16 clients at once; a follower has bytes before the end.
func TestRangedFetch(t *testing.T) {
	up := newUpstream(t)
	rb := newRangedBlob(2 << 20)
	rb.install(up)
	tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, withChunks(4, 128<<10))

	var wg sync.WaitGroup
	errs := make(chan error, 16)
	var early atomic.Bool
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(tm.srv.URL + rb.path)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			var got bytes.Buffer
			if i == 0 {
				// The first client checks it has bytes while the download is still going.
				if _, err := io.CopyN(&got, resp.Body, 64<<10); err == nil && tm.Stats().Downloads == 1 {
					early.Store(true)
				}
			}
			if _, err := io.Copy(&got, resp.Body); err != nil || !bytes.Equal(got.Bytes(), rb.blob) {
				errs <- fmt.Errorf("client %d: %d bytes, right %v, %v", i, got.Len(), bytes.Equal(got.Bytes(), rb.blob), err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	requests, peak, sent := rb.stats()
	if sent != int64(len(rb.blob)) {
		t.Errorf("upstream sent %d bytes for a %d-byte blob: each byte must be fetched once", sent, len(rb.blob))
	}
	if peak < 2 || peak > 4 {
		t.Errorf("%d connections at once, want several and at most 4", peak)
	}
	if want := 1 + (len(rb.blob)-256<<10)/(128<<10); requests != want {
		t.Errorf("%d upstream requests, want %d (two chunks first, then one per chunk)", requests, want)
	}
	if !early.Load() {
		t.Error("the first client got nothing before the download ended")
	}
	if _, err := tm.store.Size(rb.digest()); err != nil {
		t.Errorf("blob not stored: %v", err)
	}
	assertStoreIntact(t, tm)
}

// TestRangedFetchSmallAndRangeless: a blob under two chunks is one request; an upstream
// that answers a range with the whole blob is one stream, as before.
func TestRangedFetchSmallAndRangeless(t *testing.T) {
	for _, tc := range []struct {
		name     string
		size     int
		noRanges bool
	}{
		{"small", 200 << 10, false},
		{"rangeless", 1 << 20, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t)
			rb := newRangedBlob(tc.size)
			rb.noRanges = tc.noRanges
			rb.install(up)
			tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, withChunks(4, 128<<10))
			status, body, clean := fetch(t, tm.srv.URL+rb.path)
			if status != 200 || !clean || !bytes.Equal(body, rb.blob) {
				t.Fatalf("status %d clean %v right %v", status, clean, bytes.Equal(body, rb.blob))
			}
			if requests, _, sent := rb.stats(); requests != 1 || sent != int64(len(rb.blob)) {
				t.Fatalf("%d requests, %d bytes sent; want one request for the whole blob", requests, sent)
			}
			assertStoreIntact(t, tm)
		})
	}
}

// TestRangedFetchFaults: chunks that break off are resumed; chunks that keep failing, or
// come back wrong, fail the download cleanly: never a complete response of wrong bytes,
// nothing stored. A redirected chunk is followed.
func TestRangedFetchFaults(t *testing.T) {
	const chunk = 128 << 10
	third := fmt.Sprintf("bytes=%d-", 2*chunk+chunk) // the second chunk after the first range
	for _, tc := range []struct {
		name      string
		misbehave func(rb *rangedBlob) func(w http.ResponseWriter, r *http.Request, n int) bool
		wantOK    bool
	}{
		{"chunk breaks off once", func(rb *rangedBlob) func(w http.ResponseWriter, r *http.Request, n int) bool {
			var once sync.Once
			return func(w http.ResponseWriter, r *http.Request, n int) bool {
				hit := false
				if strings.HasPrefix(r.Header.Get("Range"), third) {
					once.Do(func() { hit = true })
				}
				if !hit {
					return false
				}
				w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", 3*chunk, 4*chunk-1, len(rb.blob)))
				w.Header().Set("Content-Length", strconv.Itoa(chunk))
				w.WriteHeader(http.StatusPartialContent)
				w.Write(rb.blob[3*chunk : 3*chunk+chunk/3])
				panic(http.ErrAbortHandler)
			}
		}, true},
		{"chunk always breaks off", func(rb *rangedBlob) func(w http.ResponseWriter, r *http.Request, n int) bool {
			return func(w http.ResponseWriter, r *http.Request, n int) bool {
				if !strings.HasPrefix(r.Header.Get("Range"), third) {
					return false
				}
				w.WriteHeader(http.StatusInternalServerError)
				return true
			}
		}, false},
		{"chunk with a flipped byte", func(rb *rangedBlob) func(w http.ResponseWriter, r *http.Request, n int) bool {
			return func(w http.ResponseWriter, r *http.Request, n int) bool {
				if !strings.HasPrefix(r.Header.Get("Range"), third) {
					return false
				}
				b := bytes.Clone(rb.blob[3*chunk : 4*chunk])
				b[100] ^= 0xff
				w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", 3*chunk, 4*chunk-1, len(rb.blob)))
				w.Header().Set("Content-Length", strconv.Itoa(chunk))
				w.WriteHeader(http.StatusPartialContent)
				w.Write(b)
				return true
			}
		}, false},
		{"chunk of another range", func(rb *rangedBlob) func(w http.ResponseWriter, r *http.Request, n int) bool {
			return func(w http.ResponseWriter, r *http.Request, n int) bool {
				if !strings.HasPrefix(r.Header.Get("Range"), third) {
					return false
				}
				w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", 0, chunk-1, len(rb.blob)))
				w.Header().Set("Content-Length", strconv.Itoa(chunk))
				w.WriteHeader(http.StatusPartialContent)
				w.Write(rb.blob[:chunk])
				return true
			}
		}, false},
		{"chunks redirected", func(rb *rangedBlob) func(w http.ResponseWriter, r *http.Request, n int) bool {
			return func(w http.ResponseWriter, r *http.Request, n int) bool {
				if r.URL.Query().Get("cdn") != "" || n == 1 {
					return false
				}
				// Blobs on a CDN path of the same registry host, as registries do.
				http.Redirect(w, r, rb.path+"?cdn=1", http.StatusTemporaryRedirect)
				return true
			}
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t)
			rb := newRangedBlob(1 << 20)
			rb.misbehave = tc.misbehave(rb)
			rb.install(up)
			tm := newMirrorWith(t, t.TempDir(), map[string][]string{"docker.io": {up.URL()}}, faultClient, withChunks(4, chunk))
			status, body, clean := fetch(t, tm.srv.URL+rb.path)
			complete := status == 200 && clean
			if complete && !bytes.Equal(body, rb.blob) {
				t.Fatalf("a complete response of %d wrong bytes", len(body))
			}
			if complete != tc.wantOK {
				t.Fatalf("status %d clean %v, want success %v", status, clean, tc.wantOK)
			}
			_, err := tm.store.Size(rb.digest())
			if (err == nil) != tc.wantOK {
				t.Fatalf("stored: %v, want %v", err == nil, tc.wantOK)
			}
			if requests, _, _ := rb.stats(); requests < 3 {
				t.Fatalf("%d requests: the blob was not fetched in ranges; the test proves nothing", requests)
			}
			assertStoreIntact(t, tm)
		})
	}
}

// TestRangedFollowerRange: a client asking for a range in a chunk still arriving gets it
// while the download runs, last byte after verification; from a lying upstream, never clean.
func TestRangedFollowerRange(t *testing.T) {
	for _, corrupt := range []bool{false, true} {
		t.Run(fmt.Sprint("corrupt=", corrupt), func(t *testing.T) {
			up := newUpstream(t)
			rb := newRangedBlob(2 << 20)
			rb.pause = 3 * time.Millisecond
			if corrupt {
				rb.misbehave = func(w http.ResponseWriter, r *http.Request, n int) bool {
					if !strings.HasPrefix(r.Header.Get("Range"), fmt.Sprintf("bytes=%d-", 1<<20)) {
						return false
					}
					b := bytes.Clone(rb.blob[1<<20 : 1<<20+128<<10])
					b[10] ^= 0xff
					w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", 1<<20, 1<<20+128<<10-1, len(rb.blob)))
					w.Header().Set("Content-Length", strconv.Itoa(len(b)))
					w.WriteHeader(http.StatusPartialContent)
					rb.write(w, r, b)
					return true
				}
			}
			rb.install(up)
			tm := newMirror(t, map[string][]string{"docker.io": {up.URL()}}, withChunks(4, 128<<10))
			go http.Get(tm.srv.URL + rb.path) // starts the download
			for deadline := time.Now().Add(30 * time.Second); tm.Stats().Downloads == 0; time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("no download started")
				}
			}
			rng := fmt.Sprintf("bytes=%d-%d", 1<<20, 1<<20+1000)
			status, body, clean := getRange(t, tm.srv.URL+rb.path, rng)
			if corrupt {
				if status/100 == 2 && clean {
					t.Fatalf("a corrupt chunk's range answered %d with %d clean bytes", status, len(body))
				}
			} else if status != http.StatusPartialContent || !clean || !bytes.Equal(body, rb.blob[1<<20:1<<20+1001]) {
				t.Fatalf("range %s: %d clean %v right %v", rng, status, clean, bytes.Equal(body, rb.blob[1<<20:1<<20+1001]))
			}
			waitNoDownloads(t, tm)
			assertStoreIntact(t, tm)
		})
	}
}
