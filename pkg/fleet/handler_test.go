package fleet

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

var (
	testKey  = bytes.Repeat([]byte{0x42}, KeySize)
	otherKey = bytes.Repeat([]byte{0x24}, KeySize)
)

// blobSource serves chunks of blobs and manifests held in memory and records what it was
// asked.
type blobSource struct {
	mu        sync.Mutex
	blobs     map[digest.Digest][]byte
	manifests map[digest.Digest]testManifest
	calls     []ChunkRequest
	mcalls    []ManifestRequest
	// err, when set, is returned by OpenChunk and OpenManifest; failAfter >= 0 makes the
	// reader fail after that many bytes; extra appends bytes beyond the requested range.
	err       error
	failAfter int
	extra     bool
	gate      chan struct{} // when set, reading waits until it is closed
}

func newBlobSource(blobs ...[]byte) *blobSource {
	s := &blobSource{blobs: map[digest.Digest][]byte{}, manifests: map[digest.Digest]testManifest{}, failAfter: -1}
	for _, b := range blobs {
		s.blobs[digest.FromBytes(b)] = b
	}
	return s
}

func (s *blobSource) OpenChunk(ctx context.Context, req ChunkRequest) (io.ReadCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, req)
	if s.err != nil {
		return nil, s.err
	}
	b, ok := s.blobs[req.Digest]
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", req.Digest, ErrNotFound)
	}
	chunk := b[req.Offset : req.Offset+req.Length]
	if s.extra {
		chunk = append(bytes.Clone(chunk), "trailing garbage"...)
	}
	var r io.Reader = bytes.NewReader(chunk)
	if s.failAfter >= 0 {
		r = io.MultiReader(io.LimitReader(r, int64(s.failAfter)), errReader{errors.New("upstream reset")})
	}
	if s.gate != nil {
		r = gatedReader{s.gate, r}
	}
	return io.NopCloser(r), nil
}

type testManifest struct {
	body      []byte
	mediaType string
}

// addManifest stores a manifest under the digest of body (whatever mediaType says).
func (s *blobSource) addManifest(body []byte, mediaType string) digest.Digest {
	d := digest.FromBytes(body)
	s.mu.Lock()
	s.manifests[d] = testManifest{body, mediaType}
	s.mu.Unlock()
	return d
}

func (s *blobSource) OpenManifest(ctx context.Context, req ManifestRequest) ([]byte, string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mcalls = append(s.mcalls, req)
	if s.err != nil {
		return nil, "", s.err
	}
	m, ok := s.manifests[req.Digest]
	if !ok {
		return nil, "", fmt.Errorf("manifest %s: %w", req.Digest, ErrNotFound)
	}
	return m.body, m.mediaType, nil
}

// callCount counts the calls of both kinds.
func (s *blobSource) callCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.calls) + len(s.mcalls)
}

// chunkOnly hides the source's OpenManifest: a ChunkSource that is no ManifestSource.
type chunkOnly struct{ ChunkSource }

type gatedReader struct {
	gate <-chan struct{}
	r    io.Reader
}

func (g gatedReader) Read(p []byte) (int, error) {
	<-g.gate
	return g.r.Read(p)
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

// testLogger logs to t until the test's cleanups run: memberlist's goroutines may log a
// last line after Shutdown returns, which t.Log would turn into a panic.
func testLogger(t *testing.T) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// peerServer runs the peer API for src with the test key and returns its base URL and
// the bytes it counted out, per peer.
func peerServer(t *testing.T, src ChunkSource) (string, *sync.Map) {
	t.Helper()
	var sent sync.Map
	h := &handler{src: src, handlerConfig: handlerConfig{
		sign:        signer{key: deriveKey(testKey, labelSign)},
		maxChunk:    1 << 20,
		maxManifest: testMaxManifest,
		writeIdle:   30 * time.Second,
		log:         testLogger(t),
		sent: func(peer string) func(int64) {
			v, _ := sent.LoadOrStore(peer, new(atomic.Int64))
			return func(n int64) { v.(*atomic.Int64).Add(n) }
		},
		now: time.Now,
	}}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.URL, &sent
}

// testMaxManifest is the manifest bound of the peerServer.
const testMaxManifest = 64 << 10

const ociManifest = "application/vnd.oci.image.manifest.v1+json"

// testManifestBody is a manifest-like JSON document of exactly n bytes (n >= 64).
func testManifestBody(n int) []byte {
	head := `{"schemaVersion":2,"mediaType":"` + ociManifest + `","x":"`
	pad := n - len(head) - len(`"}`)
	return []byte(head + strings.Repeat("m", pad) + `"}`)
}

func manifestReq(d digest.Digest) ManifestRequest {
	return ManifestRequest{Registry: "docker.io", Repo: "library/nginx", Digest: d}
}

func testBlob(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

func chunkReq(blob []byte, off, length int64) ChunkRequest {
	return ChunkRequest{Registry: "docker.io", Repo: "library/nginx", Digest: digest.FromBytes(blob),
		Size: int64(len(blob)), Offset: off, Length: length}
}

func signed(t *testing.T, base, method, target string, key []byte, peer string, at time.Time) *http.Request {
	t.Helper()
	r, err := http.NewRequest(method, base+target, nil)
	if err != nil {
		t.Fatal(err)
	}
	signer{key: deriveKey(key, labelSign)}.sign(r, peer, at)
	return r
}

func do(t *testing.T, r *http.Request) (*http.Response, []byte, error) {
	t.Helper()
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatalf("%s %s: %v", r.Method, r.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

func errorCode(t *testing.T, body []byte) string {
	t.Helper()
	var env struct {
		Errors []struct{ Code, Message string }
	}
	if err := json.Unmarshal(body, &env); err != nil || len(env.Errors) != 1 {
		t.Fatalf("body %q is not an OCI error envelope with one error: %v", body, err)
	}
	return env.Errors[0].Code
}

func TestPeerAPIAuthentication(t *testing.T) {
	blob := testBlob(100_000)
	src := newBlobSource(blob)
	base, _ := peerServer(t, src)
	req := chunkReq(blob, 1000, 5000)
	target := req.target()
	other := chunkReq(blob, 6000, 5000).target()
	// Each request is signed when it is built, not at the test's start: a loaded machine
	// may take seconds to reach the last case, and the window is checked to the second.
	now := time.Now

	tests := []authCase{
		{"valid", func() *http.Request { return signed(t, base, "GET", target, testKey, "node-a", now()) }, true},
		{"valid, 20s old", func() *http.Request {
			return signed(t, base, "GET", target, testKey, "node-a", now().Add(-20*time.Second))
		}, true},
		{"valid, 20s ahead", func() *http.Request {
			return signed(t, base, "GET", target, testKey, "node-a", now().Add(20*time.Second))
		}, true},
		{"no headers", func() *http.Request {
			r, _ := http.NewRequest("GET", base+target, nil)
			return r
		}, false},
		{"no signature", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Header.Del(HeaderSignature)
			return r
		}, false},
		{"no time", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Header.Del(HeaderTime)
			return r
		}, false},
		{"no peer", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Header.Del(HeaderPeer)
			return r
		}, false},
		{"wrong key", func() *http.Request { return signed(t, base, "GET", target, otherKey, "node-a", now()) }, false},
		{"fleet key itself, not the derived one", func() *http.Request {
			r, _ := http.NewRequest("GET", base+target, nil)
			signer{key: testKey}.sign(r, "node-a", now())
			return r
		}, false},
		{"tampered path", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.URL.Path = blobsPath + digest.FromString("other").String()
			return r
		}, false},
		{"tampered query value", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.URL.RawQuery = strings.Replace(r.URL.RawQuery, "offset=1000", "offset=2000", 1)
			return r
		}, false},
		{"tampered registry", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.URL.RawQuery = strings.Replace(r.URL.RawQuery, "registry=docker.io", "registry=ghcr.io", 1)
			return r
		}, false},
		{"query parameter appended", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.URL.RawQuery += "&x=1"
			return r
		}, false},
		{"query reordered", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			q := strings.Split(r.URL.RawQuery, "&")
			q[0], q[1] = q[1], q[0]
			r.URL.RawQuery = strings.Join(q, "&")
			return r
		}, false},
		{"tampered method", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Method = "HEAD"
			return r
		}, false},
		{"tampered peer name", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Header.Set(HeaderPeer, "node-b")
			return r
		}, false},
		{"tampered time", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Header.Set(HeaderTime, fmt.Sprint(now().Unix()+1))
			return r
		}, false},
		{"time with a sign", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Header.Set(HeaderTime, "+"+r.Header.Get(HeaderTime))
			return r
		}, false},
		{"expired", func() *http.Request {
			return signed(t, base, "GET", target, testKey, "node-a", now().Add(-signatureWindow-5*time.Second))
		}, false},
		{"long expired", func() *http.Request {
			return signed(t, base, "GET", target, testKey, "node-a", now().Add(-24*time.Hour))
		}, false},
		{"future", func() *http.Request {
			return signed(t, base, "GET", target, testKey, "node-a", now().Add(signatureWindow+5*time.Second))
		}, false},
		{"replayed on another path", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r2 := signed(t, base, "GET", other, testKey, "node-a", now())
			r2.Header = r.Header.Clone()
			return r2
		}, false},
		{"signature twice", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Header.Add(HeaderSignature, r.Header.Get(HeaderSignature))
			return r
		}, false},
		{"signature upper-case hex", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Header.Set(HeaderSignature, strings.ToUpper(r.Header.Get(HeaderSignature)))
			return r
		}, true}, // the same bytes: hex decoding is case-insensitive, the MAC is what counts
		{"signature truncated", func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Header.Set(HeaderSignature, r.Header.Get(HeaderSignature)[:62])
			return r
		}, false},
		{"unauthenticated 404 path", func() *http.Request {
			r, _ := http.NewRequest("GET", base+"/nope", nil)
			return r
		}, false},
		{"unauthenticated POST", func() *http.Request {
			r, _ := http.NewRequest("POST", base+target, nil)
			return r
		}, false},
	}
	checkAuth(t, src, tests, blob[1000:6000])
}

func TestPeerAPIValidation(t *testing.T) {
	blob := testBlob(10_000)
	src := newBlobSource(blob)
	base, _ := peerServer(t, src)
	good := chunkReq(blob, 0, 100)
	d := good.Digest.String()
	q := queryWith([]string{"registry", "docker.io", "repo", "library/nginx", "size", "10000",
		"offset", "0", "length", "100", "hop", "0"})
	tests := []validationCase{
		{"ok", "GET", blobsPath + d + "?" + q(), 200, ""},
		{"ok head", "HEAD", blobsPath + d + "?" + q(), 200, ""},
		{"ok hop 1", "GET", blobsPath + d + "?" + q("hop", "1"), 200, ""},
		{"ok registry with port", "GET", blobsPath + d + "?" + q("registry", "localhost:5000"), 200, ""},
		{"other path", "GET", "/v2/", 404, "NOT_FOUND"},
		{"blobs prefix only", "GET", blobsPath + "?" + q(), 400, "BAD_REQUEST"},
		{"extra path element", "GET", blobsPath + d + "/x?" + q(), 404, "NOT_FOUND"},
		{"encoded slash", "GET", blobsPath + "sha256%2F..%2Fx?" + q(), 404, "NOT_FOUND"},
		{"dot dot", "GET", "/peer/v1/blobs/../blobs/" + d + "?" + q(), 404, "NOT_FOUND"},
		{"POST", "POST", blobsPath + d + "?" + q(), 405, "UNSUPPORTED"},
		{"DELETE", "DELETE", blobsPath + d + "?" + q(), 405, "UNSUPPORTED"},
		{"md5 digest", "GET", blobsPath + "md5:d41d8cd98f00b204e9800998ecf8427e?" + q(), 400, "BAD_REQUEST"},
		{"short hex", "GET", blobsPath + d[:len(d)-1] + "?" + q(), 400, "BAD_REQUEST"},
		{"upper-case hex", "GET", blobsPath + "sha256:" + strings.ToUpper(good.Digest.Encoded()) + "?" + q(), 400, "BAD_REQUEST"},
		{"no algorithm", "GET", blobsPath + good.Digest.Encoded() + "?" + q(), 400, "BAD_REQUEST"},
		{"sha512 unknown blob", "GET", blobsPath + digest.SHA512.FromString("x").String() + "?" + q(), 404, "BLOB_UNKNOWN"},
		{"missing registry", "GET", blobsPath + d + "?" + q("registry", ""), 400, "BAD_REQUEST"},
		{"missing hop", "GET", blobsPath + d + "?" + q("hop", ""), 400, "BAD_REQUEST"},
		{"duplicate offset", "GET", blobsPath + d + "?" + q() + "&offset=0", 400, "BAD_REQUEST"},
		{"unknown parameter", "GET", blobsPath + d + "?" + q() + "&ns=ghcr.io", 400, "BAD_REQUEST"},
		{"bad query escape", "GET", blobsPath + d + "?" + q() + "&%zz=1", 400, "BAD_REQUEST"},
		{"negative offset", "GET", blobsPath + d + "?" + q("offset", "-1"), 400, "BAD_REQUEST"},
		{"plus sign", "GET", blobsPath + d + "?" + q("offset", "%2B1"), 400, "BAD_REQUEST"},
		{"leading zero", "GET", blobsPath + d + "?" + q("length", "0100"), 400, "BAD_REQUEST"},
		{"hex size", "GET", blobsPath + d + "?" + q("size", "0x10"), 400, "BAD_REQUEST"},
		{"zero length", "GET", blobsPath + d + "?" + q("length", "0"), 400, "BAD_REQUEST"},
		{"length over the cap", "GET", blobsPath + d + "?" + q("size", "9999999", "length", "1048577"), 400, "BAD_REQUEST"},
		{"range beyond size", "GET", blobsPath + d + "?" + q("offset", "9950"), 400, "BAD_REQUEST"},
		{"range overflow", "GET", blobsPath + d + "?" + q("offset", "9223372036854775807", "size", "9223372036854775807"), 400, "BAD_REQUEST"},
		{"size overflow", "GET", blobsPath + d + "?" + q("size", "99999999999999999999"), 400, "BAD_REQUEST"},
		{"hop 2", "GET", blobsPath + d + "?" + q("hop", "2"), 400, "BAD_REQUEST"},
		{"registry with path", "GET", blobsPath + d + "?" + q("registry", "docker.io%2Fx"), 400, "BAD_REQUEST"},
		{"registry with userinfo", "GET", blobsPath + d + "?" + q("registry", "u%40docker.io"), 400, "BAD_REQUEST"},
		{"registry port 0", "GET", blobsPath + d + "?" + q("registry", "localhost:0"), 400, "BAD_REQUEST"},
		{"registry port too big", "GET", blobsPath + d + "?" + q("registry", "localhost:65536"), 400, "BAD_REQUEST"},
		{"registry hyphen label", "GET", blobsPath + d + "?" + q("registry", "-x.io"), 400, "BAD_REQUEST"},
		{"registry scheme", "GET", blobsPath + d + "?" + q("registry", "http:%2F%2Fx"), 400, "BAD_REQUEST"},
		{"registry ipv6 with zone", "GET", blobsPath + d + "?" + q("registry", "%5Bfe80::1%25eth0%5D:5000"), 400, "BAD_REQUEST"},
		{"registry ipv6", "GET", blobsPath + d + "?" + q("registry", "%5B::1%5D:5000"), 200, ""},
		{"repo upper case", "GET", blobsPath + d + "?" + q("repo", "Library/nginx"), 400, "BAD_REQUEST"},
		{"repo dot dot", "GET", blobsPath + d + "?" + q("repo", "library/..%2Fx"), 400, "BAD_REQUEST"},
		{"repo empty component", "GET", blobsPath + d + "?" + q("repo", "library%2F%2Fnginx"), 400, "BAD_REQUEST"},
		{"repo too long", "GET", blobsPath + d + "?" + q("repo", strings.Repeat("a", 256)), 400, "BAD_REQUEST"},
	}
	checkValidation(t, base, src, tests)
}

func TestPeerAPIStreamsExactlyTheRange(t *testing.T) {
	blob := testBlob(300_000)
	for _, tt := range []struct {
		name      string
		off, n    int64
		failAfter int
		extra     bool
		srcErr    error
		status    int // 0: a 200 whose body must fail before its end
	}{
		{name: "whole", off: 0, n: 300_000, failAfter: -1, status: 200},
		{name: "middle", off: 12345, n: 200_000, failAfter: -1, status: 200},
		{name: "last byte", off: 299_999, n: 1, failAfter: -1, status: 200},
		{name: "source has more", off: 0, n: 1000, failAfter: -1, extra: true, status: 200},
		{name: "source fails midway", off: 0, n: 200_000, failAfter: 150_000},
		{name: "source fails at once", off: 0, n: 200_000, failAfter: 0},
		{name: "source fails before the last byte", off: 0, n: 200_000, failAfter: 199_999},
		{name: "not found", off: 0, n: 10, failAfter: -1, srcErr: fmt.Errorf("x: %w", ErrNotFound), status: 404},
		{name: "unavailable", off: 0, n: 10, failAfter: -1, srcErr: fmt.Errorf("x: %w", ErrUnavailable), status: 503},
		{name: "rate-limited", off: 0, n: 10, failAfter: -1, srcErr: fmt.Errorf("x: %w", ErrTooManyRequests), status: 429},
		{name: "other error", off: 0, n: 10, failAfter: -1, srcErr: errors.New("disk on fire"), status: 503},
	} {
		t.Run(tt.name, func(t *testing.T) {
			src := newBlobSource(blob)
			src.failAfter, src.extra, src.err = tt.failAfter, tt.extra, tt.srcErr
			base, sent := peerServer(t, src)
			resp, body, err := do(t, signed(t, base, "GET", chunkReq(blob, tt.off, tt.n).target(), testKey, "node-a", time.Now()))
			if tt.status == 0 {
				if resp.StatusCode != 200 || err == nil {
					t.Fatalf("status %d, %d bytes, read error %v: want a 200 whose body fails", resp.StatusCode, len(body), err)
				}
				if int64(len(body)) >= tt.n {
					t.Fatalf("got all %d bytes of a failed chunk", len(body))
				}
				return
			}
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tt.status)
			}
			if tt.status != 200 {
				return
			}
			if err != nil || !bytes.Equal(body, blob[tt.off:tt.off+tt.n]) {
				t.Fatalf("read %d bytes (err %v), want exactly the %d of the range", len(body), err, tt.n)
			}
			if resp.ContentLength != tt.n {
				t.Fatalf("Content-Length %d, want %d", resp.ContentLength, tt.n)
			}
			if got := countedOut(sent, "node-a", tt.n); got != tt.n {
				t.Fatalf("bytes counted out to node-a: %d, want %d", got, tt.n)
			}
		})
	}
}

func TestPeerAPIHeadSendsNoBody(t *testing.T) {
	blob := testBlob(5000)
	base, sent := peerServer(t, newBlobSource(blob))
	resp, body, err := do(t, signed(t, base, "HEAD", chunkReq(blob, 0, 5000).target(), testKey, "node-a", time.Now()))
	if err != nil || resp.StatusCode != 200 || resp.ContentLength != 5000 || len(body) != 0 {
		t.Fatalf("HEAD: status %d, Content-Length %d, %d body bytes, err %v", resp.StatusCode, resp.ContentLength, len(body), err)
	}
	if _, ok := sent.Load("node-a"); ok {
		t.Fatal("HEAD counted bytes out")
	}
}

func TestPeerAPIManifestAuthentication(t *testing.T) {
	src := newBlobSource()
	d := src.addManifest(testManifestBody(1000), ociManifest)
	base, _ := peerServer(t, src)
	target := manifestReq(d).target()
	// Each request is signed when it is built, not at the test's start: a loaded machine
	// may take seconds to reach the last case, and the window is checked to the second.
	now := time.Now
	tamper := func(f func(r *http.Request)) func() *http.Request {
		return func() *http.Request {
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			f(r)
			return r
		}
	}
	tests := []authCase{
		{"valid", tamper(func(*http.Request) {}), true},
		{"valid head", func() *http.Request { return signed(t, base, "HEAD", target, testKey, "node-a", now()) }, true},
		{"no headers", func() *http.Request {
			r, _ := http.NewRequest("GET", base+target, nil)
			return r
		}, false},
		{"wrong key", func() *http.Request { return signed(t, base, "GET", target, otherKey, "node-a", now()) }, false},
		{"tampered digest", tamper(func(r *http.Request) {
			r.URL.Path = manifestsPath + digest.FromString("other").String()
		}), false},
		{"moved to the blobs path", tamper(func(r *http.Request) {
			r.URL.Path = blobsPath + d.String()
		}), false},
		{"tampered registry", tamper(func(r *http.Request) {
			r.URL.RawQuery = strings.Replace(r.URL.RawQuery, "registry=docker.io", "registry=ghcr.io", 1)
		}), false},
		{"tampered repo", tamper(func(r *http.Request) {
			r.URL.RawQuery = strings.Replace(r.URL.RawQuery, "repo=library%2Fnginx", "repo=library%2Fredis", 1)
		}), false},
		{"tampered hop", tamper(func(r *http.Request) {
			r.URL.RawQuery = strings.Replace(r.URL.RawQuery, "hop=0", "hop=1", 1)
		}), false},
		{"query parameter appended", tamper(func(r *http.Request) { r.URL.RawQuery += "&x=1" }), false},
		{"query reordered", tamper(func(r *http.Request) {
			q := strings.Split(r.URL.RawQuery, "&")
			q[0], q[2] = q[2], q[0]
			r.URL.RawQuery = strings.Join(q, "&")
		}), false},
		{"tampered method", tamper(func(r *http.Request) { r.Method = "HEAD" }), false},
		{"tampered peer name", tamper(func(r *http.Request) { r.Header.Set(HeaderPeer, "node-b") }), false},
		{"expired", func() *http.Request {
			return signed(t, base, "GET", target, testKey, "node-a", now().Add(-signatureWindow-5*time.Second))
		}, false},
		{"a chunk request's signature", func() *http.Request {
			blob := testBlob(100)
			r := signed(t, base, "GET", target, testKey, "node-a", now())
			r.Header = signed(t, base, "GET", chunkReq(blob, 0, 100).target(), testKey, "node-a", now()).Header
			return r
		}, false},
	}
	checkAuth(t, src, tests, src.manifests[d].body)
}

func TestPeerAPIManifestValidation(t *testing.T) {
	src := newBlobSource()
	d := src.addManifest(testManifestBody(500), ociManifest).String()
	base, _ := peerServer(t, src)
	q := queryWith([]string{"registry", "docker.io", "repo", "library/nginx", "hop", "0"})
	tests := []validationCase{
		{"ok", "GET", manifestsPath + d + "?" + q(), 200, ""},
		{"ok head", "HEAD", manifestsPath + d + "?" + q(), 200, ""},
		{"ok hop 1", "GET", manifestsPath + d + "?" + q("hop", "1"), 200, ""},
		{"ok registry with port", "GET", manifestsPath + d + "?" + q("registry", "localhost:5000"), 200, ""},
		{"ok registry ipv6", "GET", manifestsPath + d + "?" + q("registry", "%5B::1%5D:5000"), 200, ""},
		{"unknown manifest", "GET", manifestsPath + digest.FromString("x").String() + "?" + q(), 404, "MANIFEST_UNKNOWN"},
		{"sha512 unknown manifest", "GET", manifestsPath + digest.SHA512.FromString("x").String() + "?" + q(), 404, "MANIFEST_UNKNOWN"},
		{"manifests prefix only", "GET", manifestsPath + "?" + q(), 400, "BAD_REQUEST"},
		{"no trailing slash", "GET", "/peer/v1/manifests?" + q(), 404, "NOT_FOUND"},
		{"extra path element", "GET", manifestsPath + d + "/x?" + q(), 404, "NOT_FOUND"},
		{"encoded slash", "GET", manifestsPath + "sha256%2F..%2Fx?" + q(), 404, "NOT_FOUND"},
		{"dot dot", "GET", "/peer/v1/manifests/../manifests/" + d + "?" + q(), 404, "NOT_FOUND"},
		{"tag, not digest", "GET", manifestsPath + "latest?" + q(), 400, "BAD_REQUEST"},
		{"POST", "POST", manifestsPath + d + "?" + q(), 405, "UNSUPPORTED"},
		{"PUT", "PUT", manifestsPath + d + "?" + q(), 405, "UNSUPPORTED"},
		{"md5 digest", "GET", manifestsPath + "md5:d41d8cd98f00b204e9800998ecf8427e?" + q(), 400, "BAD_REQUEST"},
		{"short hex", "GET", manifestsPath + d[:len(d)-1] + "?" + q(), 400, "BAD_REQUEST"},
		{"upper-case hex", "GET", manifestsPath + strings.ToUpper(d) + "?" + q(), 400, "BAD_REQUEST"},
		{"missing registry", "GET", manifestsPath + d + "?" + q("registry", ""), 400, "BAD_REQUEST"},
		{"missing repo", "GET", manifestsPath + d + "?" + q("repo", ""), 400, "BAD_REQUEST"},
		{"missing hop", "GET", manifestsPath + d + "?" + q("hop", ""), 400, "BAD_REQUEST"},
		{"duplicate hop", "GET", manifestsPath + d + "?" + q() + "&hop=0", 400, "BAD_REQUEST"},
		{"chunk parameters", "GET", manifestsPath + d + "?" + q() + "&size=500&offset=0&length=500", 400, "BAD_REQUEST"},
		{"unknown parameter", "GET", manifestsPath + d + "?" + q() + "&ns=ghcr.io", 400, "BAD_REQUEST"},
		{"bad query escape", "GET", manifestsPath + d + "?" + q() + "&%zz=1", 400, "BAD_REQUEST"},
		{"hop 2", "GET", manifestsPath + d + "?" + q("hop", "2"), 400, "BAD_REQUEST"},
		{"hop 01", "GET", manifestsPath + d + "?" + q("hop", "01"), 400, "BAD_REQUEST"},
		{"registry with path", "GET", manifestsPath + d + "?" + q("registry", "docker.io%2Fx"), 400, "BAD_REQUEST"},
		{"registry with userinfo", "GET", manifestsPath + d + "?" + q("registry", "u%40docker.io"), 400, "BAD_REQUEST"},
		{"registry scheme", "GET", manifestsPath + d + "?" + q("registry", "http:%2F%2Fx"), 400, "BAD_REQUEST"},
		{"repo upper case", "GET", manifestsPath + d + "?" + q("repo", "Library/nginx"), 400, "BAD_REQUEST"},
		{"repo dot dot", "GET", manifestsPath + d + "?" + q("repo", "library/..%2Fx"), 400, "BAD_REQUEST"},
		{"repo with a tag", "GET", manifestsPath + d + "?" + q("repo", "library/nginx:latest"), 400, "BAD_REQUEST"},
		{"repo too long", "GET", manifestsPath + d + "?" + q("repo", strings.Repeat("a", 256)), 400, "BAD_REQUEST"},
	}
	checkValidation(t, base, src, tests)
}

func TestPeerAPIServesManifests(t *testing.T) {
	body := testManifestBody(3000)
	d := digest.FromBytes(body)
	tests := []struct {
		name      string
		body      []byte
		mediaType string
		srcErr    error
		chunkOnly bool // the source is no ManifestSource
		method    string
		status    int
		code      string
		wantType  string // the Content-Type of a 200
	}{
		{name: "ok", body: body, mediaType: ociManifest, status: 200, wantType: ociManifest},
		{name: "head", method: "HEAD", body: body, mediaType: ociManifest, status: 200, wantType: ociManifest},
		{name: "docker media type", body: body, mediaType: "application/vnd.docker.distribution.manifest.v2+json",
			status: 200, wantType: "application/vnd.docker.distribution.manifest.v2+json"},
		{name: "media type sent bare", body: body, mediaType: "Application/VND.OCI.image.index.v1+json; charset=utf-8",
			status: 200, wantType: "application/vnd.oci.image.index.v1+json"},
		{name: "exactly the bound", body: testManifestBody(testMaxManifest), mediaType: ociManifest, status: 200, wantType: ociManifest},
		{name: "one byte over the bound", body: testManifestBody(testMaxManifest + 1), mediaType: ociManifest, status: 503, code: "UNAVAILABLE"},
		{name: "no media type", body: body, mediaType: "", status: 503, code: "UNAVAILABLE"},
		{name: "media type without subtype", body: body, mediaType: "manifest", status: 503, code: "UNAVAILABLE"},
		{name: "media type with a newline", body: body, mediaType: "text/plain\r\nX-Evil: 1", status: 503, code: "UNAVAILABLE"},
		{name: "media type too long", body: body, mediaType: "application/" + strings.Repeat("x", 250), status: 503, code: "UNAVAILABLE"},
		{name: "not found", srcErr: fmt.Errorf("x: %w", ErrNotFound), status: 404, code: "MANIFEST_UNKNOWN"},
		{name: "rate-limited", srcErr: fmt.Errorf("x: %w", ErrTooManyRequests), status: 429, code: "TOOMANYREQUESTS"},
		{name: "unavailable", srcErr: fmt.Errorf("x: %w", ErrUnavailable), status: 503, code: "UNAVAILABLE"},
		{name: "other error", srcErr: errors.New("disk on fire"), status: 503, code: "UNAVAILABLE"},
		{name: "source without manifests", chunkOnly: true, body: body, mediaType: ociManifest, status: 404, code: "NOT_FOUND"},
		{name: "source without manifests, POST", chunkOnly: true, method: "POST", body: body, mediaType: ociManifest, status: 404, code: "NOT_FOUND"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := newBlobSource()
			src.err = tt.srcErr
			if tt.body != nil {
				// Stored under d whatever the body: the source, not the handler, verifies.
				src.manifests[d] = testManifest{tt.body, tt.mediaType}
			}
			var cs ChunkSource = src
			if tt.chunkOnly {
				cs = chunkOnly{src}
			}
			base, sent := peerServer(t, cs)
			method := cmp.Or(tt.method, "GET")
			resp, got, err := do(t, signed(t, base, method, manifestReq(d).target(), testKey, "node-a", time.Now()))
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, body %q; want %d", resp.StatusCode, got, tt.status)
			}
			if n := len(src.mcalls); n != 0 && tt.chunkOnly {
				t.Fatal("OpenManifest called through a source that is no ManifestSource")
			}
			if tt.status != 200 {
				if method == "GET" {
					if code := errorCode(t, got); code != tt.code {
						t.Fatalf("code %s, want %s", code, tt.code)
					}
				}
				if _, ok := sent.Load("node-a"); ok {
					t.Fatal("bytes counted out for a refusal")
				}
				return
			}
			if ct := resp.Header.Values("Content-Type"); len(ct) != 1 || ct[0] != tt.wantType {
				t.Fatalf("Content-Type %q, want %q", ct, tt.wantType)
			}
			if resp.ContentLength != int64(len(tt.body)) {
				t.Fatalf("Content-Length %d, want %d", resp.ContentLength, len(tt.body))
			}
			v, _ := sent.Load("node-a")
			if method == "HEAD" {
				if len(got) != 0 || v != nil {
					t.Fatalf("HEAD: %d body bytes, counted %v", len(got), v)
				}
				return
			}
			if err != nil || !bytes.Equal(got, tt.body) {
				t.Fatalf("read %d bytes (err %v), want the %d of the manifest", len(got), err, len(tt.body))
			}
			if got := countedOut(sent, "node-a", int64(len(tt.body))); got != int64(len(tt.body)) {
				t.Fatalf("bytes counted out to node-a: %d, want %d", got, len(tt.body))
			}
			if c := src.mcalls; len(c) != 1 || c[0] != manifestReq(d) {
				t.Fatalf("source asked %+v", c)
			}
		})
	}
}

// countedOut waits for the bytes counted out to peer to reach want and returns the count:
// the handler counts after its last write, which the client can have read by then.
func countedOut(sent *sync.Map, peer string, want int64) int64 {
	var got int64
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if v, ok := sent.Load(peer); ok {
			if got = v.(*atomic.Int64).Load(); got == want {
				break
			}
		}
	}
	return got
}

// authCase is a request to the peer API, built at the moment it is sent, that must be
// served (ok) or refused as unauthenticated.
type authCase struct {
	name string
	// build returns the request to send, from a correctly signed GET of the target.
	build func() *http.Request
	ok    bool
}

// checkAuth sends each case: a served GET answers want; a refused one gets 401
// UNAUTHORIZED that does not say why, and src is never called.
func checkAuth(t *testing.T, src *blobSource, tests []authCase, want []byte) {
	t.Helper()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := src.callCount()
			r := tt.build()
			resp, body, err := do(t, r)
			if tt.ok {
				if resp.StatusCode != http.StatusOK || err != nil {
					t.Fatalf("status %d, err %v, body %q; want 200", resp.StatusCode, err, body)
				}
				if r.Method == "GET" && !bytes.Equal(body, want) {
					t.Fatalf("got %d bytes, not the %d asked for", len(body), len(want))
				}
				return
			}
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("status %d, body %q; want 401", resp.StatusCode, body)
			}
			if r.Method != "HEAD" {
				if code := errorCode(t, body); code != "UNAUTHORIZED" {
					t.Fatalf("code %s, want UNAUTHORIZED", code)
				}
				if bytes.Contains(body, []byte("expired")) || bytes.Contains(body, []byte("signature")) {
					t.Fatalf("a refusal says why: %q", body)
				}
			}
			if n := src.callCount(); n != before {
				t.Fatalf("the source was called for an unauthenticated request")
			}
		})
	}
}

// validationCase is a signed request and the status (and error code) it must get.
type validationCase struct {
	name, method, target string
	status               int
	code                 string
}

// checkValidation sends each case signed: src is called for the valid ones and never for
// a request refused as invalid.
func checkValidation(t *testing.T, base string, src *blobSource, tests []validationCase) {
	t.Helper()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := src.callCount()
			resp, body, _ := do(t, signed(t, base, tt.method, tt.target, testKey, "node-a", time.Now()))
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, body %q; want %d", resp.StatusCode, body, tt.status)
			}
			if tt.status == http.StatusMethodNotAllowed && resp.Header.Get("Allow") != "GET, HEAD" {
				t.Fatalf("405 with Allow %q, want GET, HEAD", resp.Header.Get("Allow"))
			}
			if tt.code != "" && tt.method != "HEAD" {
				if code := errorCode(t, body); code != tt.code {
					t.Fatalf("code %s, want %s", code, tt.code)
				}
			}
			called := src.callCount() != before
			if tt.status == 400 || tt.status == 405 || tt.code == "NOT_FOUND" {
				if called {
					t.Fatal("the source was called for an invalid request")
				}
			} else if !called {
				t.Fatal("the source was not called for a valid request")
			}
		})
	}
}

// queryWith returns a builder of peer queries: the parameters of defaults (name, value
// pairs, in order), overridden by its kv pairs; a "" value leaves the parameter out.
func queryWith(defaults []string) func(kv ...string) string {
	return func(kv ...string) string {
		m := map[string]string{}
		for i := 0; i < len(defaults); i += 2 {
			m[defaults[i]] = defaults[i+1]
		}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		var parts []string
		for i := 0; i < len(defaults); i += 2 {
			if v := m[defaults[i]]; v != "" {
				parts = append(parts, defaults[i]+"="+v)
			}
		}
		return strings.Join(parts, "&")
	}
}
