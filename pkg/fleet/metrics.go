package fleet

import (
	"fmt"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
)

type fleetMetrics struct {
	bytesIn, bytesOut prometheus.Counter
	fallbacks         *prometheus.CounterVec
	faults            prometheus.Counter
}

// newMetrics creates the fleet's collectors and registers them on reg (nil: kept
// unregistered, still counting). live is read at scrape time.
func newMetrics(reg prometheus.Registerer, live func() float64) (*fleetMetrics, []prometheus.Collector, error) {
	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "node_mirror_peer_bytes_total",
		Help: "Chunk and manifest bytes exchanged with fleet members, by direction (in: fetched from peers, out: served to peers).",
	}, []string{"direction"})
	fallbacks := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "node_mirror_peer_fallbacks_total",
		Help: "Chunks and manifests fetched from upstream because their owner could not serve them, by reason (down, timeout, refused, fault, error).",
	}, []string{"reason"})
	m := &fleetMetrics{
		bytesIn:   bytes.WithLabelValues("in"),
		bytesOut:  bytes.WithLabelValues("out"),
		fallbacks: fallbacks,
		faults: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "node_mirror_peer_faults_total",
			Help: "Faults reported against peers: bytes that failed verification, or repeated errors.",
		}),
	}
	for _, r := range fallbackReasons {
		fallbacks.WithLabelValues(r) // every reason shows, at 0, from the start
	}
	members := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "node_mirror_fleet_members",
		Help: "Live fleet members as this node sees them, itself included.",
	}, live)
	cs := []prometheus.Collector{bytes, fallbacks, m.faults, members}
	if reg == nil {
		return m, nil, nil
	}
	for i, c := range cs {
		if err := reg.Register(c); err != nil {
			for _, done := range cs[:i] {
				reg.Unregister(done)
			}
			return nil, nil, fmt.Errorf("fleet metrics: %w", err)
		}
	}
	return m, slices.Clip(cs), nil
}

func (m *fleetMetrics) fallback(reason string) {
	if !slices.Contains(fallbackReasons, reason) {
		reason = FallbackError // the label set stays bounded whatever a caller passes
	}
	m.fallbacks.WithLabelValues(reason).Inc()
}
