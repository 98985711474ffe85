// Package metrics defines node-mirror's Prometheus metrics. Every method is safe on a
// nil *Metrics, so packages can record unconditionally and tests can pass nil.
package metrics

import (
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics holds every node_mirror_* collector.
type Metrics struct {
	requests         *prometheus.CounterVec
	bytesServed      *prometheus.CounterVec
	bytesUpstream    *prometheus.CounterVec
	upstreamDuration *prometheus.HistogramVec
	upstreamErrors   *prometheus.CounterVec
	inflight         prometheus.Gauge
	authFailures     prometheus.Counter
	rateLimit        *prometheus.GaugeVec
	configReloads    *prometheus.CounterVec
	passThrough      *prometheus.CounterVec
	upstreamConns    *prometheus.GaugeVec
	chunkRetries     *prometheus.CounterVec
}

// StoreStats reports the store's size for the gauges, read at scrape time.
type StoreStats func() (bytes int64, entries int)

// New registers the collectors on reg.
func New(reg prometheus.Registerer, stats StoreStats) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "node_mirror_requests_total",
			Help: "Pull API requests by registry, kind (manifest, blob, tags, referrers) and cache result (hit, miss, stale, error).",
		}, []string{"registry", "kind", "result"}),
		bytesServed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "node_mirror_served_bytes_total",
			Help: "Body bytes sent to clients, by source: cache (was on disk) or upstream (streamed from a download).",
		}, []string{"source"}),
		bytesUpstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "node_mirror_upstream_fetched_bytes_total",
			Help: "Blob bytes fetched from upstream registries.",
		}, []string{"registry"}),
		upstreamDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "node_mirror_upstream_request_duration_seconds",
			Help:    "Time to response headers of upstream requests, by registry and status (0 for network errors).",
			Buckets: prometheus.ExponentialBuckets(0.005, 3, 9),
		}, []string{"registry", "status"}),
		upstreamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "node_mirror_upstream_errors_total",
			Help: "Upstream requests that failed, by registry and status (0 for network errors).",
		}, []string{"registry", "status"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "node_mirror_inflight_downloads",
			Help: "Blob downloads from upstream in progress.",
		}),
		authFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "node_mirror_client_auth_failures_total",
			Help: "Client requests refused for missing or wrong credentials.",
		}),
		rateLimit: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "node_mirror_upstream_ratelimit_remaining",
			Help: "The last ratelimit-remaining an upstream registry reported (Docker Hub pulls left).",
		}, []string{"registry"}),
		configReloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "node_mirror_config_reloads_total",
			Help: "Configuration reloads on SIGHUP, by result (ok, error).",
		}, []string{"result"}),
	}
	m.passThrough = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "node_mirror_passthrough_total",
		Help: "Content served from upstream without being stored, by reason (disk_full, budget, store_error).",
	}, []string{"reason"})
	reg.MustRegister(m.passThrough)
	m.upstreamConns = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "node_mirror_upstream_connections",
		Help: "Upstream connections blob downloads hold now, by registry (a ranged fetch holds several).",
	}, []string{"registry"})
	m.chunkRetries = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "node_mirror_chunk_retries_total",
		Help: "Ranges of blob downloads asked for again after they broke off or came back wrong, by registry.",
	}, []string{"registry"})
	reg.MustRegister(m.upstreamConns, m.chunkRetries)
	reg.MustRegister(m.requests, m.bytesServed, m.bytesUpstream, m.upstreamDuration, m.upstreamErrors,
		m.inflight, m.authFailures, m.rateLimit, m.configReloads)
	if stats != nil {
		reg.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "node_mirror_store_bytes", Help: "Bytes of committed blobs in the store.",
			}, func() float64 { b, _ := stats(); return float64(b) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "node_mirror_store_entries", Help: "Committed blobs (layers, configs, manifests) in the store.",
			}, func() float64 { _, n := stats(); return float64(n) }),
		)
	}
	return m
}

// Request counts one pull API request.
func (m *Metrics) Request(registry, kind, result string) {
	if m != nil {
		m.requests.WithLabelValues(registry, kind, result).Inc()
	}
}

// Served counts body bytes sent to a client from source "cache" or "upstream".
func (m *Metrics) Served(source string, n int64) {
	if m != nil && n > 0 {
		m.bytesServed.WithLabelValues(source).Add(float64(n))
	}
}

// Fetched counts blob bytes read from an upstream.
func (m *Metrics) Fetched(registry string, n int) {
	if m != nil && n > 0 {
		m.bytesUpstream.WithLabelValues(registry).Add(float64(n))
	}
}

// Upstream records one upstream request: status 0 means a network error.
func (m *Metrics) Upstream(registry string, status int, d time.Duration, failed bool) {
	if m == nil {
		return
	}
	s := strconv.Itoa(status)
	m.upstreamDuration.WithLabelValues(registry, s).Observe(d.Seconds())
	if failed {
		m.upstreamErrors.WithLabelValues(registry, s).Inc()
	}
}

// ObserveUpstream returns a hook for upstream.Options.Observe that records latency,
// errors and Docker Hub's rate-limit header for one registry.
func (m *Metrics) ObserveUpstream(registry string) func(*http.Response, time.Duration, error) {
	return func(resp *http.Response, d time.Duration, err error) {
		if resp == nil {
			m.Upstream(registry, 0, d, true)
			return
		}
		m.Upstream(registry, resp.StatusCode, d, resp.StatusCode >= 400 && resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusNotFound)
		if v := resp.Header.Get("Ratelimit-Remaining"); v != "" {
			m.RateLimit(registry, v)
		}
	}
}

// RateLimit records a ratelimit-remaining header such as "97;w=21600".
func (m *Metrics) RateLimit(registry, header string) {
	if m == nil {
		return
	}
	v, _, _ := strings.Cut(header, ";")
	if n, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
		m.rateLimit.WithLabelValues(registry).Set(n)
	}
}

// DownloadStarted and DownloadDone track in-flight downloads.
func (m *Metrics) DownloadStarted() {
	if m != nil {
		m.inflight.Inc()
	}
}

// DownloadDone is the pair of DownloadStarted.
func (m *Metrics) DownloadDone() {
	if m != nil {
		m.inflight.Dec()
	}
}

// AuthFailure counts a refused client.
func (m *Metrics) AuthFailure() {
	if m != nil {
		m.authFailures.Inc()
	}
}

// PassThrough counts content served without being stored.
func (m *Metrics) PassThrough(reason string) {
	if m != nil {
		m.passThrough.WithLabelValues(reason).Inc()
	}
}

// CacheStats reports the store's budget and evictions, read at scrape time.
type CacheStats func() (budgetBytes, evictedBlobs, evictedBytes int64)

// RegisterCache adds the budget gauge and eviction counters.
func RegisterCache(reg prometheus.Registerer, stats CacheStats) {
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "node_mirror_store_budget_bytes", Help: "The store's size limit in bytes (0: none).",
		}, func() float64 { b, _, _ := stats(); return float64(b) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "node_mirror_evicted_blobs_total", Help: "Blobs evicted to stay within the budget.",
		}, func() float64 { _, n, _ := stats(); return float64(n) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "node_mirror_evicted_bytes_total", Help: "Bytes evicted to stay within the budget.",
		}, func() float64 { _, _, b := stats(); return float64(b) }),
	)
}

// ConfigReload counts a reload attempt.
func (m *Metrics) ConfigReload(ok bool) {
	if m == nil {
		return
	}
	r := "ok"
	if !ok {
		r = "error"
	}
	m.configReloads.WithLabelValues(r).Inc()
}

// UpstreamConnections adds delta to the connections downloads hold to registry.
func (m *Metrics) UpstreamConnections(registry string, delta int) {
	if m == nil {
		return
	}
	m.upstreamConns.WithLabelValues(registry).Add(float64(delta))
}

// ChunkRetried counts a range of a download asked for again.
func (m *Metrics) ChunkRetried(registry string) {
	if m == nil {
		return
	}
	m.chunkRetries.WithLabelValues(registry).Inc()
}
