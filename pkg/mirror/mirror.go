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
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/singleflight"

	"github.com/node-mirror/node-mirror/internal/wire"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/fleet"
	"github.com/node-mirror/node-mirror/pkg/metrics"
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
	// ListTTL bounds reuse of tag lists and referrers answers (default 30s).
	ListTTL time.Duration
	// MaxManifestSize refuses larger manifests (default 4 MiB).
	MaxManifestSize int64
	// EagerFetch is how many layers of a requested image manifest are fetched at once in
	// the background, before the engine asks for them; 0 (or less) turns it off. Taken
	// as given: the daemon's default (4) lives in its configuration.
	EagerFetch int
	// FetchConcurrency is how many connections fetch one cold blob when its upstream
	// answers ranges; 1 fetches every blob as one stream. Default DefaultFetchConcurrency.
	FetchConcurrency int
	// FetchChunkSize is the size of the ranges a blob is fetched in; blobs under two
	// chunks are one request. Default DefaultFetchChunkSize.
	FetchChunkSize int64
	// UpstreamConnections caps, per registry, the connections ranged fetches add beyond
	// each download's first. Default DefaultUpstreamConnections.
	UpstreamConnections int
	// Fleet, when set, makes this node one of a cluster's mirrors: blobs go through the
	// owners of their chunks (FetchChunkSize must be the same on every member).
	Fleet *fleet.Fleet
	// Platform selects the image of an index that eager fetching follows; default: this
	// node's platform.
	Platform string
	Logger   *slog.Logger
	Metrics  *metrics.Metrics
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

	policy atomic.Pointer[policy] // swapped whole by Reconfigure

	flight singleflight.Group // manifests and lists, keyed by what is fetched

	stats    counters
	platform platforms.MatchComparer

	eager      chan eagerJob // queued work for the eager workers
	eagerOn    atomic.Bool   // at least one worker runs
	eagerMu    sync.Mutex
	eagerStops []chan struct{} // one per running worker; closing it stops that worker

	mu        sync.Mutex
	downloads map[string]*download     // blob digest -> the one download in flight
	conns     map[string]chan struct{} // registry -> connection slots for ranged fetches
	rangeless map[string]time.Time     // registry -> until when it is fetched from as one stream
	sizes     map[digest.Digest]int64  // blob sizes named by manifests served (fleet)
	suspects  map[digest.Digest]*suspicion
	chunks    chunkTable             // the fleet's chunks this node has or fetches
	checked   map[string]time.Time   // tag key -> last successful revalidation
	lists     listCache              // tags/list and referrers answers
	listSlots chan struct{}          // list fetches in flight (each holds its body in memory)
	eagerDone map[digest.Digest]bool // fetched ahead of the engine, not yet served

	// tagWaitHook, set by tests only, runs when a tag request has joined its revalidation.
	tagWaitHook func()
}

// New returns a Mirror over the given store and registries.
func New(opts Options) (*Mirror, error) {
	if opts.Store == nil || len(opts.Registries) == 0 {
		return nil, errors.New("mirror needs a store and at least one registry")
	}
	if opts.StaleAfter <= 0 {
		opts.StaleAfter = 3 * time.Second
	}
	if opts.FetchConcurrency <= 0 {
		opts.FetchConcurrency = DefaultFetchConcurrency
	}
	if opts.FetchChunkSize <= 0 {
		opts.FetchChunkSize = DefaultFetchChunkSize
	}
	if opts.UpstreamConnections <= 0 {
		opts.UpstreamConnections = DefaultUpstreamConnections
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Mirror{
		opts:      opts,
		store:     opts.Store,
		log:       opts.Logger,
		ctx:       ctx,
		cancel:    cancel,
		downloads: map[string]*download{},
		conns:     map[string]chan struct{}{},
		rangeless: map[string]time.Time{},
		sizes:     map[digest.Digest]int64{},
		suspects:  map[digest.Digest]*suspicion{},
		chunks:    chunkTable{entries: map[chunkKey]*tableEntry{}},
		checked:   map[string]time.Time{},
		listSlots: make(chan struct{}, maxListFetches),
		eagerDone: map[digest.Digest]bool{},
		eager:     make(chan eagerJob, 1024),
	}
	m.stats.since = time.Now()
	m.platform = platforms.Default()
	if opts.Platform != "" {
		p, err := platforms.Parse(opts.Platform)
		if err != nil {
			return nil, fmt.Errorf("platform %q: %w", opts.Platform, err)
		}
		m.platform = platforms.Only(p)
	}
	if err := m.Reconfigure(opts); err != nil {
		return nil, err
	}
	if opts.Fleet != nil {
		m.wg.Add(1)
		go m.janitorFleet()
	}
	return m, nil
}

// policy is the reloadable part of the configuration.
type policy struct {
	registries      map[string]*upstream.Client
	def             string
	tagFreshness    time.Duration
	listTTL         time.Duration
	maxManifestSize int64

	// users counts requests and background work still talking to upstream through these
	// clients. A reload retires the policy: its clients' idle connections are closed at
	// once (and the transport closes busy ones as they come back), and again when the
	// last user leaves, for connections that work begun before the reload dialled after
	// it. Nothing would ever take them from the pool again.
	users   atomic.Int64
	retired atomic.Pointer[[]*upstream.Client] // set by retire: the clients the next policy dropped
}

func (p *policy) hold() {
	if p != nil {
		p.users.Add(1)
	}
}

func (p *policy) release() {
	if p == nil || p.users.Add(-1) != 0 {
		return
	}
	// A release to zero before retire stored the list is covered by retire's own close.
	if gone := p.retired.Load(); gone != nil {
		closeIdle(*gone)
	}
}

// retire hands the policy's clients that next does not use over to closing.
func (p *policy) retire(next *policy) {
	var gone []*upstream.Client
	for name, c := range p.registries {
		if next == nil || next.registries[name] != c {
			gone = append(gone, c)
		}
	}
	p.retired.Store(&gone)
	closeIdle(gone)
}

func closeIdle(clients []*upstream.Client) {
	for _, c := range clients {
		c.CloseIdleConnections()
	}
}

// Reconfigure applies the reloadable options (Registries, DefaultRegistry, TagFreshness,
// ListTTL, MaxManifestSize, EagerFetch) to new requests; the others stay as New set them.
// Requests and downloads in flight finish with the registries they started with, whose
// connections are closed once they are done.
func (m *Mirror) Reconfigure(o Options) error {
	if len(o.Registries) == 0 {
		return errors.New("no registries")
	}
	if o.DefaultRegistry != "" && o.Registries[o.DefaultRegistry] == nil {
		return fmt.Errorf("default registry %s is not configured", o.DefaultRegistry)
	}
	if o.ListTTL <= 0 {
		o.ListTTL = 30 * time.Second
	}
	if o.MaxManifestSize <= 0 {
		o.MaxManifestSize = 4 << 20
	}
	next := &policy{registries: o.Registries, def: o.DefaultRegistry, tagFreshness: o.TagFreshness,
		listTTL: o.ListTTL, maxManifestSize: o.MaxManifestSize}
	if old := m.policy.Swap(next); old != nil {
		old.retire(next)
	}
	m.setEagerWorkers(o.EagerFetch)
	return nil
}

// Close stops background downloads and waits for them to leave the store consistent.
func (m *Mirror) Close() {
	m.cancel()
	m.wg.Wait()
	m.policy.Load().retire(nil)
}

// ServeHTTP implements the OCI distribution pull API.
func (m *Mirror) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		wire.Write(w, r, errUnsupported)
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
	pol := m.policy.Load()
	pol.hold()
	defer pol.release()
	rt, err := parseRoute(r, func(name string) bool { return pol.registries[name] != nil }, pol.def)
	if err != nil {
		wire.Write(w, r, err)
		return
	}
	rt.client, rt.policy = pol.registries[rt.registry], pol
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	noteRoute(r.Context(), rt)
	switch rt.kind {
	case kindManifests:
		m.serveManifest(w, r, rt)
	case kindBlobs:
		m.serveBlob(w, r, rt)
	case kindTags, kindReferrers:
		m.serveList(w, r, rt)
	}
}

// counters are what status reports since the start: request results and bytes saved.
type counters struct {
	since                                    time.Time
	hits, misses, stale, errors, passThrough atomic.Int64
	cacheBytes                               atomic.Int64 // blob bytes served from disk
}

// count notes one answered request by result.
func (m *Mirror) count(result string) {
	switch result {
	case ResultHit:
		m.stats.hits.Add(1)
	case ResultMiss:
		m.stats.misses.Add(1)
	case ResultStale:
		m.stats.stale.Add(1)
	case ResultError:
		m.stats.errors.Add(1)
	}
}

// Stats are the mirror's counters since it started.
type Stats struct {
	Since       time.Time `json:"since"`
	Hits        int64     `json:"hits"`
	Misses      int64     `json:"misses"`
	Stale       int64     `json:"stale"`
	Errors      int64     `json:"errors"`
	PassThrough int64     `json:"passThrough"`
	// BytesSaved is blob bytes served from the store instead of upstream.
	BytesSaved int64 `json:"bytesSaved"`
	// Downloads is blob downloads in flight; Active says how far each has come.
	Downloads int                `json:"downloads"`
	Active    []DownloadProgress `json:"active,omitempty"`
}

// Stats reports the counters since the mirror started.
func (m *Mirror) Stats() Stats {
	m.mu.Lock()
	ds := make([]*download, 0, len(m.downloads))
	for _, d := range m.downloads {
		ds = append(ds, d)
	}
	m.mu.Unlock()
	active := make([]DownloadProgress, 0, len(ds))
	for _, d := range ds {
		active = append(active, d.progress())
	}
	slices.SortFunc(active, func(a, b DownloadProgress) int { return a.Since.Compare(b.Since) })
	return Stats{
		Since: m.stats.since, Hits: m.stats.hits.Load(), Misses: m.stats.misses.Load(),
		Stale: m.stats.stale.Load(), Errors: m.stats.errors.Load(), PassThrough: m.stats.passThrough.Load(),
		BytesSaved: m.stats.cacheBytes.Load(), Downloads: len(ds), Active: active,
	}
}

// Store returns the content store the mirror serves from.
func (m *Mirror) Store() *contentstore.Store { return m.store }

// fail logs a failed request once, here at the edge, and answers with the wire error.
func (m *Mirror) fail(w http.ResponseWriter, r *http.Request, rt route, err error) {
	we := toWire(err, rt.kind)
	noteResult(r.Context(), ResultError)
	m.count(ResultError)
	level := slog.LevelWarn
	if we.Status == http.StatusNotFound {
		level = slog.LevelDebug
	}
	m.log.Log(r.Context(), level, "request failed", "method", r.Method, "registry", rt.registry,
		"repo", rt.repo, "kind", rt.kind, "ref", rt.ref, "status", we.Status, "err", err)
	wire.Write(w, r, we)
}

func setContentHeaders(w http.ResponseWriter, mediaType, dgst string, size int64) {
	h := w.Header()
	h.Set("Content-Type", mediaType)
	h.Set("Docker-Content-Digest", dgst)
	h.Set("Content-Length", strconv.FormatInt(size, 10))
	h.Set("Etag", fmt.Sprintf("%q", dgst))
}
