// Package testenv is the harness the tests across the repository share: an in-process
// upstream registry that counts what it is asked, the node-mirror binary as a process, a real
// containerd daemon, and the engine configuration a test points at the mirror.
//
// Everything listens on, and talks to, loopback only.
package testenv

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/node-mirror/node-mirror/internal/fault"
)

// seedHeader marks the requests the push helpers make, so the request log holds only what
// the code under test asked for, and hooks and faults meant for it leave the pushes alone.
const seedHeader = "X-Testenv-Seed"

// Request is one request the upstream received.
type Request struct {
	Method string
	Path   string
	Query  string
	Status int // 0 while the handler still runs
	// UserAgent tells who asked: the mirror, or an engine that bypassed it.
	UserAgent string
	// Range is the request's Range header: a ranged fetch asks for its chunks with it.
	Range string
}

// Hook may answer a request of the code under test itself, returning true; returning false
// passes the request on to Faults and the registry. It runs after the request was logged.
type Hook func(w http.ResponseWriter, r *http.Request) bool

// Upstream is a registry (go-containerregistry's pkg/registry) on a loopback port that keeps
// its address and its content across Stop and Start, so a mirror configured with its URL
// sees it go down and come back.
//
// A request of the code under test is logged, then offered to the hook (SetHook), then
// passes Faults, then the middleware (WithMiddleware), then RFCRanges and the registry.
// The push helpers' requests skip the log, the hook and Faults.
type Upstream struct {
	// Faults misbehaves on request (internal/fault); without rules it passes everything.
	// Its stalls end when the test does, before the server closes.
	Faults *fault.Injector

	t       testing.TB
	handler http.Handler // the middleware, RFCRanges and the registry
	addr    string
	// push carries the push helpers' requests; Stop closes its idle connections, so they
	// do not show up among the connections the code under test holds open.
	push *http.Transport

	mu   sync.Mutex
	srv  *httptest.Server
	reqs []Request
	hook Hook
	open int // connections accepted and not yet closed
}

// UpstreamOption configures NewUpstream.
type UpstreamOption func(*upstreamConfig)

type upstreamConfig struct {
	wrap      func(http.Handler) http.Handler
	diskBlobs bool
}

// WithMiddleware puts wrap in front of the registry (inside the request log and Faults),
// where the push helpers' requests pass it too.
func WithMiddleware(wrap func(http.Handler) http.Handler) UpstreamOption {
	return func(c *upstreamConfig) { c.wrap = wrap }
}

// WithDiskBlobs keeps the registry's blobs in files below a t.TempDir() instead of in
// memory, so a test that measures its own process's heap measures the code under test,
// not the upstream's growing store.
func WithDiskBlobs() UpstreamOption {
	return func(c *upstreamConfig) { c.diskBlobs = true }
}

// NewUpstream starts an upstream registry with the referrers API enabled. It is closed when
// the test ends.
func NewUpstream(t testing.TB, opts ...UpstreamOption) *Upstream {
	t.Helper()
	var cfg upstreamConfig
	for _, o := range opts {
		o(&cfg)
	}
	ropts := []registry.Option{registry.Logger(log.New(io.Discard, "", 0)), registry.WithReferrersSupport(true)}
	if cfg.diskBlobs {
		ropts = append(ropts, registry.WithBlobHandler(registry.NewDiskBlobHandler(t.TempDir())))
	}
	var h http.Handler = RFCRanges(registry.New(ropts...))
	if cfg.wrap != nil {
		h = cfg.wrap(h)
	}
	u := &Upstream{t: t, handler: h, Faults: fault.New(h), addr: "127.0.0.1:0", push: &http.Transport{}}
	u.Start()
	t.Cleanup(u.Stop)
	t.Cleanup(u.Faults.Close) // first: stalled handlers return, so the server can close
	return u
}

// URL is the upstream's endpoint, e.g. http://127.0.0.1:40123; it stays the same across
// Stop and Start.
func (u *Upstream) URL() string { return "http://" + u.addr }

// Host is the upstream's host:port.
func (u *Upstream) Host() string { return u.addr }

// Flag is the node-mirror --upstream value that makes this upstream registry name.
func (u *Upstream) Flag(name string) string { return name + "=" + u.URL() }

// Start serves again after Stop, on the same address and with the same content.
func (u *Upstream) Start() {
	u.t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.srv != nil {
		return
	}
	ln, err := listenRetry(u.addr)
	if err != nil {
		u.t.Fatalf("upstream: listen on %s: %v", u.addr, err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(u.serve))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Config.ConnState = u.connState
	srv.Start()
	u.srv = srv
	u.addr = ln.Addr().String()
}

// Stop closes the listener and every open connection: from now on connecting to the
// upstream is refused, the way an unreachable registry looks to the mirror.
func (u *Upstream) Stop() {
	u.mu.Lock()
	srv := u.srv
	u.srv = nil
	u.mu.Unlock()
	u.push.CloseIdleConnections()
	if srv == nil {
		return
	}
	srv.CloseClientConnections()
	srv.Close()
}

func (u *Upstream) connState(_ net.Conn, s http.ConnState) {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch s {
	case http.StateNew:
		u.open++
	case http.StateClosed, http.StateHijacked:
		u.open--
	}
}

// OpenConns is how many connections to the upstream are open now, idle ones included.
// The push helpers close theirs when they are done.
func (u *Upstream) OpenConns() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.open
}

// SetHook makes h see every request of the code under test first; nil removes it.
func (u *Upstream) SetHook(h Hook) {
	u.mu.Lock()
	u.hook = h
	u.mu.Unlock()
}

// listenRetry binds addr, retrying for a while: a port just released by Stop can be briefly
// busy.
func listenRetry(addr string) (net.Listener, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		ln, err := net.Listen("tcp", addr)
		if err == nil || !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			return ln, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (u *Upstream) serve(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get(seedHeader) != "" {
		u.handler.ServeHTTP(w, r)
		return
	}
	u.mu.Lock()
	i := len(u.reqs)
	u.reqs = append(u.reqs, Request{
		Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, UserAgent: r.UserAgent(), Range: r.Header.Get("Range"),
	})
	hook := u.hook
	u.mu.Unlock()
	sw := &statusWriter{ResponseWriter: w}
	defer func() {
		// Also when a hook or a fault aborts the response with a panic.
		u.mu.Lock()
		u.reqs[i].Status = sw.status()
		u.mu.Unlock()
	}()
	if hook != nil && hook(sw, r) {
		return
	}
	u.Faults.ServeHTTP(sw, r)
}

type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Flush lets hooks flush with a type assertion, as handlers commonly do.
func (w *statusWriter) Flush() {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) status() int {
	if w.code == 0 {
		return http.StatusOK
	}
	return w.code
}

// Requests returns every request received so far (push helpers excluded), in order.
func (u *Upstream) Requests() []Request {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]Request(nil), u.reqs...)
}

// ResetRequests forgets the requests received so far.
func (u *Upstream) ResetRequests() {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.reqs = nil
}

// Count is how many requests with method (any when empty) had a path ending in suffix.
func (u *Upstream) Count(method, suffix string) int {
	n := 0
	for _, r := range u.Requests() {
		if (method == "" || r.Method == method) && strings.HasSuffix(r.Path, suffix) {
			n++
		}
	}
	return n
}

// CountPath is how many requests with method (any when empty) had exactly path.
func (u *Upstream) CountPath(method, path string) int {
	n := 0
	for _, r := range u.Requests() {
		if (method == "" || r.Method == method) && r.Path == path {
			n++
		}
	}
	return n
}

// BlobGETs is how many times a blob was downloaded (GET, not HEAD) from any repository.
func (u *Upstream) BlobGETs(d v1.Hash) int {
	return u.Count(http.MethodGet, "/blobs/"+d.String())
}

// AnyBlobGETs is how many GETs of any blob there were.
func (u *Upstream) AnyBlobGETs() int {
	n := 0
	for _, r := range u.Requests() {
		if r.Method == http.MethodGet && strings.Contains(r.Path, "/blobs/") {
			n++
		}
	}
	return n
}

// BlobRanges are the Range headers of the GETs of blob d, in order ("" for a GET of the
// whole blob).
func (u *Upstream) BlobRanges(d v1.Hash) []string {
	var out []string
	for _, r := range u.Requests() {
		if r.Method == http.MethodGet && strings.HasSuffix(r.Path, "/blobs/"+d.String()) {
			out = append(out, r.Range)
		}
	}
	return out
}

// RequestLog is the request log as text, one request a line, for failure messages.
func (u *Upstream) RequestLog() string {
	var b strings.Builder
	for _, r := range u.Requests() {
		q := ""
		if r.Query != "" {
			q = "?" + r.Query
		}
		rng := ""
		if r.Range != "" {
			rng = " Range: " + r.Range
		}
		fmt.Fprintf(&b, "%s %s%s%s -> %d\n", r.Method, r.Path, q, rng, r.Status)
	}
	return b.String()
}

// Ref names repo:tag (or repo@digest) on this upstream, for pushes of the test's own.
func (u *Upstream) Ref(repoAndRef string) name.Reference {
	u.t.Helper()
	ref, err := name.ParseReference(u.addr+"/"+repoAndRef, name.Insecure, name.StrictValidation)
	if err != nil {
		u.t.Fatalf("upstream: reference %q: %v", repoAndRef, err)
	}
	return ref
}

// RemoteOptions are the go-containerregistry options that push to this upstream without
// the requests showing in the request log or meeting the hook and Faults.
func (u *Upstream) RemoteOptions() []remote.Option {
	return []remote.Option{remote.WithTransport(seedTransport{u.push})}
}

type seedTransport struct{ next http.RoundTripper }

func (s seedTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set(seedHeader, "1")
	return s.next.RoundTrip(r)
}

// Image is an image pushed to the upstream.
type Image struct {
	Repo, Tag string
	Image     v1.Image
	MediaType types.MediaType
	Digest    v1.Hash // of the manifest
	Size      int64   // of the manifest
	Config    v1.Hash
	Layers    []v1.Hash
}

// Blobs are the config and the layers.
func (i Image) Blobs() []v1.Hash { return append([]v1.Hash{i.Config}, i.Layers...) }

// Digests is everything a full pull of the image fetches: manifest, config and layers.
func (i Image) Digests() []v1.Hash { return append([]v1.Hash{i.Digest}, i.Blobs()...) }

// Index is a multi-platform index pushed to the upstream.
type Index struct {
	Repo, Tag string
	Manifest  []byte // the index, as pushed
	MediaType types.MediaType
	Digest    v1.Hash
	// Platforms maps "os/arch" to the image for it, which is also pushed (by digest).
	Platforms map[string]Image
}

// Digests is everything a pull of all platforms fetches.
func (x Index) Digests() []v1.Hash {
	ds := []v1.Hash{x.Digest}
	for _, img := range x.Platforms {
		ds = append(ds, img.Digests()...)
	}
	return ds
}

// PlatformDigests is what a pull of one platform fetches: the index and that platform's
// image.
func (x Index) PlatformDigests(platform string) []v1.Hash {
	return append([]v1.Hash{x.Digest}, x.Platforms[platform].Digests()...)
}

// Push writes img to repo:tag.
func (u *Upstream) Push(repo, tag string, img v1.Image) Image {
	u.t.Helper()
	defer u.push.CloseIdleConnections()
	if err := remote.Write(u.Ref(repo+":"+tag), img, u.RemoteOptions()...); err != nil {
		u.t.Fatalf("upstream: push %s:%s: %v", repo, tag, err)
	}
	return describe(u.t, repo, tag, img)
}

// PushRandomImage pushes a random Docker schema 2 image of layers layers of size bytes each
// (compressed sizes differ a little) to repo:tag.
func (u *Upstream) PushRandomImage(repo, tag string, layers int, size int64) Image {
	u.t.Helper()
	img, err := random.Image(size, int64(layers))
	if err != nil {
		u.t.Fatalf("upstream: random image: %v", err)
	}
	return u.Push(repo, tag, img)
}

// PushRandomIndex pushes an OCI image index under repo:tag with one random OCI image
// (layers layers of size bytes) per platform; with no platforms, linux/amd64 and linux/arm64.
// The index is written by hand, as registries serve them: descriptors carry media type,
// size, digest and platform, and no artifactType (which go-containerregistry's
// mutate.AppendManifests adds, and which skopeo 1.9 cannot copy unchanged).
func (u *Upstream) PushRandomIndex(repo, tag string, layers int, size int64, platforms ...string) Index {
	u.t.Helper()
	defer u.push.CloseIdleConnections()
	if len(platforms) == 0 {
		platforms = []string{"linux/amd64", "linux/arm64"}
	}
	out := Index{Repo: repo, Tag: tag, MediaType: types.OCIImageIndex, Platforms: map[string]Image{}}
	im := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex}
	for _, p := range platforms {
		plat, err := v1.ParsePlatform(p)
		if err != nil {
			u.t.Fatalf("upstream: platform %q: %v", p, err)
		}
		img := describe(u.t, repo, "", randomOCIImage(u.t, *plat, layers, size))
		if err := remote.Write(u.Ref(repo+"@"+img.Digest.String()), img.Image, u.RemoteOptions()...); err != nil {
			u.t.Fatalf("upstream: push %s@%s: %v", repo, img.Digest, err)
		}
		out.Platforms[p] = img
		im.Manifests = append(im.Manifests, v1.Descriptor{
			MediaType: img.MediaType, Size: img.Size, Digest: img.Digest, Platform: plat,
		})
	}
	body, err := json.Marshal(im)
	if err != nil {
		u.t.Fatal(err)
	}
	out.Manifest = body
	out.Digest, _, err = v1.SHA256(bytes.NewReader(body))
	if err != nil {
		u.t.Fatal(err)
	}
	u.PushManifest(repo, tag, types.OCIImageIndex, body)
	return out
}

// PushManifest writes a manifest of the test's own, byte for byte, to repo under ref (a
// tag or the manifest's digest).
func (u *Upstream) PushManifest(repo, ref string, mediaType types.MediaType, body []byte) {
	u.t.Helper()
	defer u.push.CloseIdleConnections()
	sep := ":"
	if strings.Contains(ref, ":") {
		sep = "@"
	}
	if err := remote.Put(u.Ref(repo+sep+ref), rawManifest{body, mediaType}, u.RemoteOptions()...); err != nil {
		u.t.Fatalf("upstream: put manifest %s%s%s: %v", repo, sep, ref, err)
	}
}

// PushBlob uploads data as a blob to repo and returns its digest.
func (u *Upstream) PushBlob(repo string, data []byte) v1.Hash {
	u.t.Helper()
	defer u.push.CloseIdleConnections()
	l := static.NewLayer(data, types.OCILayer)
	if err := remote.WriteLayer(u.Ref(repo+":unused").Context(), l, u.RemoteOptions()...); err != nil {
		u.t.Fatalf("upstream: push blob to %s: %v", repo, err)
	}
	d, err := l.Digest()
	if err != nil {
		u.t.Fatal(err)
	}
	return d
}

// PushIndex writes idx, and the images it holds, to repo:tag as go-containerregistry
// builds it (mutate.AppendManifests); PushRandomIndex writes one as registries serve them.
func (u *Upstream) PushIndex(repo, tag string, idx v1.ImageIndex) v1.Hash {
	u.t.Helper()
	defer u.push.CloseIdleConnections()
	if err := remote.WriteIndex(u.Ref(repo+":"+tag), idx, u.RemoteOptions()...); err != nil {
		u.t.Fatalf("upstream: push index %s:%s: %v", repo, tag, err)
	}
	d, err := idx.Digest()
	if err != nil {
		u.t.Fatal(err)
	}
	return d
}

// Layer is one layer of a pushed image: its digest, its bytes as served, and the path a
// client GETs it at, on the upstream or through a mirror.
type Layer struct {
	Digest digest.Digest
	Bytes  []byte
	Path   string // /v2/<repo>/blobs/<digest>
}

// Layer returns layer n of img, which was pushed to this upstream.
func (u *Upstream) Layer(img Image, n int) Layer {
	u.t.Helper()
	ls, err := img.Image.Layers()
	if err != nil || n >= len(ls) {
		u.t.Fatalf("upstream: layer %d of %s:%s: %v", n, img.Repo, img.Tag, err)
	}
	rc, err := ls[n].Compressed()
	if err != nil {
		u.t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		u.t.Fatal(err)
	}
	d := digest.Digest(img.Layers[n].String())
	return Layer{Digest: d, Bytes: b, Path: "/v2/" + img.Repo + "/blobs/" + d.String()}
}

// PushOneLayer pushes a random image of one layer of size bytes to repo:tag and returns it
// with that layer.
func (u *Upstream) PushOneLayer(repo, tag string, size int64) (Image, Layer) {
	u.t.Helper()
	img := u.PushRandomImage(repo, tag, 1, size)
	return img, u.Layer(img, 0)
}

// ServeSlowly makes GETs of path answer body in pieces of piece bytes with a pause after
// each (a flush first), so clients arrive while it streams; with chunked, no
// Content-Length is sent. It replaces the hook and returns the number of GETs it answered.
func (u *Upstream) ServeSlowly(path string, body []byte, piece int, pause time.Duration, chunked bool) *atomic.Int32 {
	var gets atomic.Int32
	u.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || r.URL.Path != path {
			return false
		}
		gets.Add(1)
		if !chunked {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		}
		w.WriteHeader(http.StatusOK)
		for i := 0; i < len(body); i += piece {
			if _, err := w.Write(body[i:min(i+piece, len(body))]); err != nil {
				return true
			}
			http.NewResponseController(w).Flush()
			if pause > 0 {
				select {
				case <-time.After(pause):
				case <-r.Context().Done():
					return true
				}
			}
		}
		return true
	})
	return &gets
}

type rawManifest struct {
	body      []byte
	mediaType types.MediaType
}

func (m rawManifest) RawManifest() ([]byte, error)        { return m.body, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return m.mediaType, nil }

// randomOCIImage is an OCI image (manifest, config and layer media types all OCI) whose
// config names platform.
func randomOCIImage(t testing.TB, platform v1.Platform, layers int, size int64) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for range layers {
		l, err := random.Layer(size, types.OCILayer)
		if err != nil {
			t.Fatalf("random layer: %v", err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			t.Fatalf("append layer: %v", err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = platform.OS, platform.Architecture, platform.Variant
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	return img
}

func describe(t testing.TB, repo, tag string, img v1.Image) Image {
	t.Helper()
	out := Image{Repo: repo, Tag: tag, Image: img}
	var err error
	if out.Digest, err = img.Digest(); err != nil {
		t.Fatal(err)
	}
	if out.Size, err = img.Size(); err != nil {
		t.Fatal(err)
	}
	if out.MediaType, err = img.MediaType(); err != nil {
		t.Fatal(err)
	}
	if out.Config, err = img.ConfigName(); err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		out.Layers = append(out.Layers, d)
	}
	return out
}
