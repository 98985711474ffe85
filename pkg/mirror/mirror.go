// Package mirror is the /v2/ pull API of node-mirror: it routes each request to a
// configured registry, answers from the content store when it can, and otherwise fetches
// from upstream once, storing what it verified.
package mirror

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// Options configure a Mirror.
type Options struct {
	Store *contentstore.Store
	// Registries by the name clients use (docker.io, ghcr.io, ...).
	Registries map[string]*upstream.Client
	// DefaultRegistry serves requests that name no registry; "" refuses them.
	DefaultRegistry string
	// TagFreshness is how long a revalidated tag is served without asking upstream again.
	TagFreshness time.Duration
	// StaleAfter is how long a tag request waits for upstream before a cached answer is
	// served instead (the revalidation carries on in the background).
	StaleAfter time.Duration
	// ListTTL bounds reuse of tag lists and referrers answers.
	ListTTL         time.Duration
	MaxManifestSize int64
	Logger          *slog.Logger
}

// Mirror is an http.Handler for /v2/.
type Mirror struct {
	opts  Options
	store *contentstore.Store
	log   *slog.Logger

	// ctx outlives requests: downloads and revalidations started by a client that goes
	// away still finish. Close cancels it.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	flight singleflight.Group // manifests and lists, keyed by what is fetched

	mu        sync.Mutex
	downloads map[string]*download   // blob digest -> the one download in flight
	checked   map[string]time.Time   // tag key -> last successful revalidation
	lists     map[string]*listAnswer // tags/list and referrers answers
}

// New returns a Mirror over the given store and registries.
func New(opts Options) (*Mirror, error) {
	if opts.Store == nil || len(opts.Registries) == 0 {
		return nil, errors.New("mirror needs a store and at least one registry")
	}
	if opts.MaxManifestSize <= 0 {
		opts.MaxManifestSize = 4 << 20
	}
	if opts.StaleAfter <= 0 {
		opts.StaleAfter = 3 * time.Second
	}
	if opts.ListTTL <= 0 {
		opts.ListTTL = 30 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Mirror{
		opts:      opts,
		store:     opts.Store,
		log:       opts.Logger,
		ctx:       ctx,
		cancel:    cancel,
		downloads: map[string]*download{},
		checked:   map[string]time.Time{},
		lists:     map[string]*listAnswer{},
	}, nil
}

// Close stops background downloads and waits for them to leave the store consistent.
func (m *Mirror) Close() {
	m.cancel()
	m.wg.Wait()
}

func (m *Mirror) isRegistry(name string) bool {
	_, ok := m.opts.Registries[name]
	return ok
}

// ServeHTTP implements the OCI distribution pull API.
func (m *Mirror) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeError(w, r, errUnsupported)
		return
	}
	if r.URL.Path == "/v2/" || r.URL.Path == "/v2" {
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "2")
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			w.Write([]byte("{}"))
		}
		return
	}
	rt, werr := parseRoute(r, m.isRegistry, m.opts.DefaultRegistry)
	if werr != nil {
		writeError(w, r, *werr)
		return
	}
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	switch rt.kind {
	case kindManifests:
		m.serveManifest(w, r, rt)
	case kindBlobs:
		m.serveBlob(w, r, rt)
	case kindTags, kindReferrers:
		m.serveList(w, r, rt)
	}
}

// fail logs a failed request once, here at the edge, and answers with the wire error.
func (m *Mirror) fail(w http.ResponseWriter, r *http.Request, rt route, err error) {
	we := toWire(err, rt.kind)
	level := slog.LevelWarn
	if we.status == http.StatusNotFound {
		level = slog.LevelDebug
	}
	m.log.Log(r.Context(), level, "request failed", "method", r.Method, "registry", rt.registry,
		"repo", rt.repo, "kind", rt.kind, "ref", rt.ref, "status", we.status, "err", err)
	writeError(w, r, we)
}

func setContentHeaders(w http.ResponseWriter, mediaType, dgst string, size int64) {
	h := w.Header()
	h.Set("Content-Type", mediaType)
	h.Set("Docker-Content-Digest", dgst)
	h.Set("Content-Length", strconv.FormatInt(size, 10))
	h.Set("Etag", fmt.Sprintf("%q", dgst))
}
