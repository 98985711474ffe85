package fleet

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/node-mirror/node-mirror/internal/regname"
)

// State is a member's membership state as this node sees it.
type State string

const (
	StateAlive   State = "alive"   // in the live set (memberlist counts a suspect member as alive until it is declared dead)
	StateLeaving State = "leaving" // announced it is leaving: no longer asked for chunks
	StateLeft    State = "left"    // left gracefully
	StateDead    State = "dead"    // failed: stopped answering probes
)

// Member is one node of the fleet.
type Member struct {
	Name       string `json:"name"`
	GossipAddr string `json:"gossip_addr"`         // memberlist host:port
	PeerAddr   string `json:"peer_addr,omitempty"` // peer API host:port, from its metadata
	State      State  `json:"state"`
	Self       bool   `json:"self,omitempty"`
}

// PeerTLS configures TLS for the peer API. With Cert and Key set, this node serves the
// peer API over TLS and dials the others with https, trusting CA (a PEM file; empty: the
// system roots). Members dial each other by the advertised address, so certificates need
// it (an IP SAN for an IP) among their names. All members must agree.
type PeerTLS struct {
	Cert, Key, CA string
}

func (t PeerTLS) enabled() bool { return t.Cert != "" || t.Key != "" }

// Config configures a Fleet. Zero durations and sizes take the defaults.
type Config struct {
	NodeName string // unique in the fleet; default: the host name
	// GossipListen is where memberlist listens, TCP and UDP: "ip:port" or ":port" (all
	// addresses). Port 0 picks one; GossipAddr reads it back.
	GossipListen string
	// PeerAdvertise is the peer API address the other members dial ("host:port"), carried
	// in this node's memberlist metadata. When GossipListen names no address, the gossip
	// address advertised is this host (if it is an IP) with the gossip port.
	PeerAdvertise string
	// Join lists gossip addresses or DNS names ("host:port"; without a port, the gossip
	// port) of any members. Joined in the background, retried with backoff until one
	// answers, and again whenever this node finds itself alone.
	Join       []string
	Key        []byte // KeySize bytes: see LoadKey
	Logger     *slog.Logger
	Registerer prometheus.Registerer // nil: metrics are not exported
	PeerTLS    PeerTLS

	DialTimeout   time.Duration // connecting to a peer; default 500ms
	HeaderTimeout time.Duration // from request sent to response headers; default 3s
	IdleTimeout   time.Duration // a body that delivers nothing for this long is aborted; default 5s
	MaxChunkSize  int64         // the largest Length served or asked; default DefaultMaxChunkSize
	// MaxManifestSize is the largest manifest served or accepted; default
	// DefaultMaxManifestSize. Set it to the mirror's own limit.
	MaxManifestSize int64

	health healthPolicy // tests shorten it
	// transport replaces memberlist's own network transport: tests cut the network with
	// it. GossipListen must then name the port it is bound to.
	transport memberlist.NodeAwareTransport
}

const (
	defaultDialTimeout   = 500 * time.Millisecond
	defaultHeaderTimeout = 3 * time.Second
	defaultIdleTimeout   = 5 * time.Second
	// Dead and left members stay listed (for status) this long.
	forgetAfter = 10 * time.Minute
	// How long Close waits for its leave to be gossiped and for chunks in flight.
	leaveTimeout = 5 * time.Second
	drainTimeout = 10 * time.Second
	// Join retries back off from joinMin to joinMax; a member that is not alone checks
	// again every aloneCheck.
	joinMin    = 500 * time.Millisecond
	joinMax    = 30 * time.Second
	aloneCheck = 5 * time.Second
	// Every reconnectEvery a member tries to join one member it saw fail (as serf does).
	// Memberlist gossips to a dead member for GossipToTheDeadTime only and then forgets
	// it, so without this the two sides of a partition that outlasts that stay two fleets
	// after the network heals, each fetching from upstream what the other has.
	reconnectEvery = 15 * time.Second
	metaV1         = 1
)

// nodeMeta is the memberlist metadata of a member (at most memberlist.MetaMaxSize bytes).
type nodeMeta struct {
	V       int    `json:"v"`
	Peer    string `json:"peer"`
	Leaving bool   `json:"leaving,omitempty"`
}

// Fleet is this node's membership in the fleet, its view of the chunk owners, and its
// client for the others' peer API.
type Fleet struct {
	cfg     Config
	log     *slog.Logger
	name    string
	sign    signer
	ml      *memberlist.Memberlist
	metrics *fleetMetrics
	regd    []prometheus.Collector
	client  *http.Client
	tr      *http.Transport
	scheme  string
	srvTLS  *tls.Config
	cliTLS  *tls.Config

	meta         []byte // guarded by mu; read by memberlist through NodeMeta
	mu           sync.Mutex
	peers        map[string]*peer // by name, self included
	srv          *http.Server     // set by Serve
	closed       bool
	wakeJoin     chan struct{} // a member left: check whether we are alone
	joinAttempts atomic.Int64
	reconnected  atomic.Int64 // reconnects that reached the member

	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// Start joins (or founds) the fleet. ctx bounds the background joining; Close leaves.
func Start(ctx context.Context, cfg Config) (*Fleet, error) {
	if err := cfg.normalize(); err != nil {
		return nil, err
	}
	f := &Fleet{
		cfg:      cfg,
		log:      cfg.Logger,
		name:     cfg.NodeName,
		sign:     signer{key: deriveKey(cfg.Key, labelSign)},
		peers:    map[string]*peer{},
		scheme:   "http",
		wakeJoin: make(chan struct{}, 1),
	}
	if err := f.setupTLS(); err != nil {
		return nil, err
	}
	var err error
	if f.metrics, f.regd, err = newMetrics(cfg.Registerer, f.liveCount); err != nil {
		return nil, err
	}
	f.meta, _ = json.Marshal(nodeMeta{V: metaV1, Peer: cfg.PeerAdvertise})
	f.peers[f.name] = &peer{Member: Member{Name: f.name, PeerAddr: cfg.PeerAdvertise, State: StateAlive, Self: true}, since: time.Now()}

	mc, err := f.memberlistConfig()
	if err != nil {
		f.unregister()
		return nil, err
	}
	if f.ml, err = memberlist.Create(mc); err != nil {
		f.unregister()
		return nil, fmt.Errorf("fleet: gossip on %s: %w", cfg.GossipListen, err)
	}
	f.tr = &http.Transport{
		DialContext:           (&net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       f.cliTLS,
		TLSHandshakeTimeout:   cfg.HeaderTimeout,
		ResponseHeaderTimeout: cfg.HeaderTimeout,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		DisableCompression:    true, // chunks are compressed layers; and Content-Length must be the chunk's
	}
	f.client = &http.Client{
		Transport: f.tr,
		// A peer answers chunks itself; a redirect is a broken or hostile peer.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	var jctx context.Context
	jctx, f.cancel = context.WithCancel(ctx)
	f.wg.Go(func() { f.joinLoop(jctx) })
	f.log.Info("fleet started", "node", f.name, "gossip", f.GossipAddr(), "peer", cfg.PeerAdvertise, "tls", f.scheme == "https")
	return f, nil
}

func (c *Config) normalize() error {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.NodeName == "" {
		h, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("fleet: node name: %w", err)
		}
		c.NodeName = h
	}
	if !validPeerName(c.NodeName) {
		return fmt.Errorf("fleet: node name %q: want 1-%d printable characters without spaces", c.NodeName, maxPeerNameLen)
	}
	if len(c.Key) != KeySize {
		return fmt.Errorf("fleet: key is %d bytes, want %d", len(c.Key), KeySize)
	}
	if err := validPeerAddr(c.PeerAdvertise); err != nil {
		return fmt.Errorf("fleet: peer advertise address: %w", err)
	}
	host, _, err := net.SplitHostPort(c.GossipListen)
	if err != nil {
		return fmt.Errorf("fleet: gossip listen address %q: want ip:port", c.GossipListen)
	}
	if host != "" && net.ParseIP(host) == nil {
		return fmt.Errorf("fleet: gossip listen address %q: want an IP address, not a name", c.GossipListen)
	}
	if c.PeerTLS.enabled() && (c.PeerTLS.Cert == "" || c.PeerTLS.Key == "") {
		return errors.New("fleet: peer TLS needs both a certificate and a key")
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = defaultDialTimeout
	}
	if c.HeaderTimeout <= 0 {
		c.HeaderTimeout = defaultHeaderTimeout
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = defaultIdleTimeout
	}
	if c.MaxChunkSize <= 0 {
		c.MaxChunkSize = DefaultMaxChunkSize
	}
	if c.MaxManifestSize <= 0 {
		c.MaxManifestSize = DefaultMaxManifestSize
	}
	if c.health == (healthPolicy{}) {
		c.health = defaultHealth
	}
	return nil
}

func (f *Fleet) setupTLS() error {
	t := f.cfg.PeerTLS
	if !t.enabled() {
		return nil
	}
	cert, err := tls.LoadX509KeyPair(t.Cert, t.Key)
	if err != nil {
		return fmt.Errorf("fleet: peer TLS: %w", err)
	}
	f.srvTLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	f.cliTLS = &tls.Config{MinVersion: tls.VersionTLS12}
	if t.CA != "" {
		pem, err := os.ReadFile(t.CA)
		if err != nil {
			return fmt.Errorf("fleet: peer TLS CA: %w", err)
		}
		f.cliTLS.RootCAs = x509.NewCertPool()
		if !f.cliTLS.RootCAs.AppendCertsFromPEM(pem) {
			return fmt.Errorf("fleet: peer TLS CA %s: no PEM certificate in it", t.CA)
		}
	}
	f.scheme = "https"
	return nil
}

// memberlistConfig tunes memberlist for a LAN fleet of a few to a thousand nodes.
func (f *Fleet) memberlistConfig() (*memberlist.Config, error) {
	host, port, _ := net.SplitHostPort(f.cfg.GossipListen)
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return nil, fmt.Errorf("fleet: gossip listen address %q: bad port", f.cfg.GossipListen)
	}
	mc := memberlist.DefaultLANConfig()
	mc.Name = f.name
	mc.BindAddr = "0.0.0.0"
	if host != "" {
		mc.BindAddr = host
		mc.AdvertiseAddr = host
	} else if ph, _, _ := net.SplitHostPort(f.cfg.PeerAdvertise); net.ParseIP(ph) != nil {
		mc.AdvertiseAddr = ph
	}
	mc.BindPort, mc.AdvertisePort = p, p
	if ip := net.ParseIP(mc.AdvertiseAddr); ip != nil && ip.IsUnspecified() {
		mc.AdvertiseAddr = "" // memberlist picks a private address of the host
	}
	// Failure detection. A probe every second with a 500 ms timeout (LAN round trips
	// are well under a millisecond; the margin is for a loaded node). A member that fails
	// its probe is suspect, and dead after SuspicionMult*max(1, log10 n) probe intervals
	// once one other member confirms (k = SuspicionMult-2 = 1), or after
	// SuspicionMaxTimeoutMult times that without confirmation: 3-6 s below 10 members,
	// 9-18 s at 1000. The defaults (4, 6) allow up to 24 s for a small fleet, needlessly
	// long here: a suspect that is alive refutes within a probe round, a member wrongly
	// declared dead rejoins on its own, and until a dead member is out, Fetch's sub-second
	// dial timeout and backoff already route around it.
	mc.ProbeInterval = time.Second
	mc.ProbeTimeout = 500 * time.Millisecond
	mc.SuspicionMult = 3
	mc.SuspicionMaxTimeoutMult = 2
	// Joins and TCP fallback probes: a LAN member answers in milliseconds or not at all,
	// and a join loop stuck on an unreachable address delays Close by this much.
	mc.TCPTimeout = 3 * time.Second
	// A member restarted on a new address (a rescheduled pod) may take its name back
	// after this, rather than after the dead member is forgotten.
	mc.DeadNodeReclaimTime = 10 * time.Second
	mc.SecretKey = deriveKey(f.cfg.Key, labelGossip)
	mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	mc.Delegate = delegate{f}
	mc.Events = events{f}
	mc.Logger = log.New(mlLog{f.log, "memberlist"}, "", 0)
	if f.cfg.transport != nil {
		mc.Transport = f.cfg.transport
	}
	return mc, nil
}

// GossipAddr is the gossip address this node advertises (host:port, the bound port).
func (f *Fleet) GossipAddr() string {
	return f.ml.LocalNode().Address()
}

// Name is this node's name in the fleet.
func (f *Fleet) Name() string { return f.name }

// Members lists every member this node knows, itself included, sorted by name: the live
// ones, and those that left or died within the last minutes.
func (f *Fleet) Members() []Member {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.forgetLocked(time.Now())
	out := make([]Member, 0, len(f.peers))
	for _, p := range f.peers {
		out = append(out, p.Member)
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

func (f *Fleet) liveCount() float64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, p := range f.peers {
		if p.State == StateAlive {
			n++
		}
	}
	return float64(n)
}

// Owners returns the members that may be asked for chunk of dgst, in rendezvous order for
// (dgst, chunk): [0] owns it; the rest is the fallback order, [1] being where the ring put
// it before [0] joined. Only live members with a peer address are listed, this node
// included, and none in quarantine or backing off after failures.
func (f *Fleet) Owners(dgst digest.Digest, chunk int64) []Member {
	now := time.Now()
	f.mu.Lock()
	cands := make([]Member, 0, len(f.peers))
	for _, p := range f.peers {
		if p.eligible(now) {
			cands = append(cands, p.Member)
		}
	}
	f.mu.Unlock()
	return rank(cands, chunkKey(dgst, chunk))
}

// ReportFault counts a fault against a peer: bytes from it failed verification, or it
// keeps failing. A few within a window quarantine it (Owners skips it) for a while.
func (f *Fleet) ReportFault(name string) {
	f.metrics.faults.Inc()
	f.mu.Lock()
	p := f.peers[name]
	var q bool
	if p != nil && !p.Self {
		q = p.fault(time.Now(), f.cfg.health)
	}
	f.mu.Unlock()
	if q {
		f.log.Warn("fleet member quarantined after repeated faults", "peer", name, "for", f.cfg.health.quarantine)
	}
}

// NoteFallback counts a chunk or manifest fetched from upstream instead of its owner;
// reason is one of the Fallback* values (FallbackReason(err) for an error from Fetch or
// FetchManifest).
func (f *Fleet) NoteFallback(reason string) { f.metrics.fallback(reason) }

// PeerStats is one member's line in `status`.
type PeerStats struct {
	Member
	BytesIn          int64     `json:"bytes_in"`  // chunk and manifest bytes this node fetched from it
	BytesOut         int64     `json:"bytes_out"` // chunk and manifest bytes this node served to it
	Faults           int64     `json:"faults"`
	QuarantinedUntil time.Time `json:"quarantined_until,omitzero"`
	BackoffUntil     time.Time `json:"backoff_until,omitzero"` // after soft failures
}

// Stats reports every member Members lists with the traffic and trouble seen with it.
func (f *Fleet) Stats() []PeerStats {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.forgetLocked(now)
	out := make([]PeerStats, 0, len(f.peers))
	for _, p := range f.peers {
		s := PeerStats{Member: p.Member, BytesIn: p.bytesIn.Load(), BytesOut: p.bytesOut.Load(), Faults: p.faultTotal}
		if now.Before(p.quarantinedUntil) {
			s.QuarantinedUntil = p.quarantinedUntil
		}
		if now.Before(p.backoffUntil) {
			s.BackoffUntil = p.backoffUntil
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b PeerStats) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// forgetLocked drops members that have been dead or gone for forgetAfter, so names of
// long-gone members do not accumulate.
func (f *Fleet) forgetLocked(now time.Time) {
	for name, p := range f.peers {
		if (p.State == StateDead || p.State == StateLeft) && now.Sub(p.since) > forgetAfter {
			delete(f.peers, name)
		}
	}
}

// Handler is the peer API for src: GET and HEAD of /peer/v1/blobs/<digest>?registry=&repo=
// &size=&offset=&length=&hop= and, if src is also a ManifestSource, of
// /peer/v1/manifests/<digest>?registry=&repo=&hop=; every request authenticated with the
// fleet key. Serve runs it; a caller running its own server needs header timeouts but no
// write timeout (chunks stream as they arrive from upstream).
func (f *Fleet) Handler(src ChunkSource) http.Handler {
	return &handler{src: src, handlerConfig: handlerConfig{
		sign:        f.sign,
		maxChunk:    f.cfg.MaxChunkSize,
		maxManifest: f.cfg.MaxManifestSize,
		writeIdle:   30 * time.Second,
		log:         f.log,
		sent:        f.sentTo,
		now:         time.Now,
	}}
}

// sentTo returns the counter for bytes served to the named peer.
func (f *Fleet) sentTo(name string) func(int64) {
	f.mu.Lock()
	p := f.peers[name]
	f.mu.Unlock()
	return func(n int64) {
		f.metrics.bytesOut.Add(float64(n))
		if p != nil {
			p.bytesOut.Add(n)
		}
	}
}

// Serve runs the peer API for src (and its manifests, if it is a ManifestSource) on ln
// (with TLS when configured) until Close, which lets the chunks in flight finish. It returns http.ErrServerClosed after Close.
func (f *Fleet) Serve(ln net.Listener, src ChunkSource) error {
	srv := &http.Server{
		Handler:           f.Handler(src),
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    16 << 10,
		TLSConfig:         f.srvTLS,
		ErrorLog:          log.New(mlLog{f.log, "peer-api"}, "", 0),
	}
	f.mu.Lock()
	if f.closed || f.srv != nil {
		f.mu.Unlock()
		ln.Close()
		if f.closed {
			return http.ErrServerClosed
		}
		return errors.New("fleet: Serve called twice")
	}
	f.srv = srv
	f.mu.Unlock()
	if f.srvTLS != nil {
		return srv.ServeTLS(ln, "", "")
	}
	return srv.Serve(ln)
}

// Close leaves the fleet: it tells the others it is leaving (they stop choosing it as an
// owner), lets the chunks it is serving finish, announces its departure and stops.
func (f *Fleet) Close() error {
	var err error
	f.closeOnce.Do(func() { err = f.stop(true) })
	return err
}

// stop ends everything; graceful says whether to announce it (Close) or vanish as a
// crashed member would (tests).
func (f *Fleet) stop(graceful bool) error {
	f.cancel()
	f.mu.Lock()
	f.closed = true
	srv := f.srv
	f.mu.Unlock()
	var errs []error
	if graceful {
		f.setLeaving()
		if err := f.ml.UpdateNode(leaveTimeout); err != nil {
			f.log.Debug("fleet: announcing leave", "err", err)
		}
		f.tellLeaving()
		if srv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
			if err := srv.Shutdown(ctx); err != nil {
				srv.Close()
			}
			cancel()
		}
		if err := f.ml.Leave(leaveTimeout); err != nil {
			errs = append(errs, fmt.Errorf("fleet: leave: %w", err))
		}
	} else if srv != nil {
		srv.Close()
	}
	if err := f.ml.Shutdown(); err != nil {
		errs = append(errs, fmt.Errorf("fleet: shutdown: %w", err))
	}
	f.wg.Wait()
	f.tr.CloseIdleConnections()
	f.unregister()
	if graceful {
		f.log.Info("left the fleet", "node", f.name)
	}
	return errors.Join(errs...)
}

func (f *Fleet) unregister() {
	for _, c := range f.regd {
		f.cfg.Registerer.Unregister(c)
	}
	f.regd = nil
}

// leavingMsg prefixes the name of a member that is about to leave.
const leavingMsg = "node-mirror leaving\x00"

// tellLeaving tells every live member directly, over TCP, that this node is leaving. The
// metadata update says the same by gossip, which reaches everyone eventually but may lose
// the race with the leave itself; then a graceful leave would be reported as a failure,
// and until then the others would keep choosing this node as an owner.
func (f *Fleet) tellLeaving() {
	msg := append([]byte(leavingMsg), f.name...)
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	// Not f.ml.Members(): its nodes are memberlist's own records, which it rewrites under
	// its lock while gossip arrives (other members leaving at the same time), and
	// SendReliable reads them without it. Copies from our table, taken under our lock.
	var to []*memberlist.Node
	f.mu.Lock()
	for _, p := range f.peers {
		if p.Self || (p.State != StateAlive && p.State != StateLeaving) {
			continue
		}
		host, port, err := net.SplitHostPort(p.GossipAddr)
		pn, perr := strconv.ParseUint(port, 10, 16)
		if ip := net.ParseIP(host); err == nil && perr == nil && ip != nil {
			to = append(to, &memberlist.Node{Name: p.Name, Addr: ip, Port: uint16(pn)})
		}
	}
	f.mu.Unlock()
	for _, n := range to {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := f.ml.SendReliable(n, msg); err != nil {
				f.log.Debug("fleet: telling a member we leave", "peer", n.Name, "err", err)
			}
		})
	}
	wg.Wait()
}

func (f *Fleet) markLeaving(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if p := f.peers[name]; p != nil && !p.Self && p.State == StateAlive {
		p.State, p.since = StateLeaving, time.Now()
	}
}

func (f *Fleet) setLeaving() {
	b, _ := json.Marshal(nodeMeta{V: metaV1, Peer: f.cfg.PeerAdvertise, Leaving: true})
	f.mu.Lock()
	f.meta = b
	f.mu.Unlock()
}

// joinLoop joins through cfg.Join whenever this node is alone: at start, and after the
// others left or a partition cut it off. Failures back off from joinMin to joinMax. It
// also joins a member seen failing now and then (reconnect), which merges the two sides
// of a partition once the network is back.
func (f *Fleet) joinLoop(ctx context.Context) {
	backoff := joinMin
	failures := 0
	nextReconnect := time.Now().Add(jitter(reconnectEvery))
	for {
		if len(f.cfg.Join) > 0 && f.ml.NumMembers() <= 1 {
			var err error
			for _, addr := range f.cfg.Join {
				if ctx.Err() != nil {
					return
				}
				// One entry at a time: Close need not wait for the rest once one answered.
				f.joinAttempts.Add(1)
				if _, err = f.ml.Join([]string{addr}); err == nil && f.ml.NumMembers() > 1 {
					break
				}
			}
			if f.ml.NumMembers() > 1 {
				f.log.Info("joined the fleet", "members", f.ml.NumMembers())
				backoff, failures = joinMin, 0
			} else {
				failures++
				lvl := slog.LevelDebug
				if failures == 1 || failures%20 == 0 {
					lvl = slog.LevelInfo
				}
				if err == nil {
					err = errors.New("only this node answered")
				}
				f.log.Log(ctx, lvl, "fleet: no member to join yet; retrying", "join", f.cfg.Join, "attempts", failures, "err", err)
				wait := jitter(backoff) // members started together spread out
				backoff = min(2*backoff, joinMax)
				if !sleep(ctx, wait) {
					return
				}
				continue
			}
		}
		if !time.Now().Before(nextReconnect) {
			f.reconnect()
			nextReconnect = time.Now().Add(jitter(reconnectEvery))
		}
		select {
		case <-ctx.Done():
			return
		case <-f.wakeJoin:
		case <-time.After(aloneCheck):
		}
	}
}

// jitter returns a duration between d/2 and d.
func jitter(d time.Duration) time.Duration { return d/2 + rand.N(d/2+1) }

// reconnect tries to join one member, picked at random, that failed (not left) and is
// still listed. One that is really gone costs one refused or timed-out dial.
func (f *Fleet) reconnect() {
	f.mu.Lock()
	f.forgetLocked(time.Now())
	var failed []*peer
	for _, p := range f.peers {
		if !p.Self && p.State == StateDead && p.GossipAddr != "" {
			failed = append(failed, p)
		}
	}
	var name, addr string
	if len(failed) > 0 {
		p := failed[rand.N(len(failed))]
		name, addr = p.Name, p.GossipAddr
	}
	f.mu.Unlock()
	if addr == "" {
		return
	}
	if _, err := f.ml.Join([]string{addr}); err != nil {
		f.log.Debug("fleet: failed member still unreachable", "peer", name, "gossip", addr, "err", err)
		return
	}
	f.reconnected.Add(1)
	f.log.Info("fleet: reached a member that had failed; merging", "peer", name, "gossip", addr)
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// delegate gives memberlist this node's metadata. Its other hooks are unused: the fleet
// shares nothing but membership through gossip.
type delegate struct{ f *Fleet }

func (d delegate) NodeMeta(limit int) []byte {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	if len(d.f.meta) > limit {
		return nil // cannot happen: the metadata is an address and a few bytes of JSON
	}
	return slices.Clone(d.f.meta)
}

// NotifyMsg receives the one message members send each other directly: "I am leaving".
// Only holders of the gossip key can send it.
func (d delegate) NotifyMsg(b []byte) {
	if name, ok := bytes.CutPrefix(b, []byte(leavingMsg)); ok {
		d.f.markLeaving(string(name))
	}
}

func (delegate) GetBroadcasts(int, int) [][]byte { return nil }
func (delegate) LocalState(bool) []byte          { return nil }
func (delegate) MergeRemoteState([]byte, bool)   {}

// events keeps the member table. Memberlist calls it with its own lock held: it must
// not call back into memberlist.
type events struct{ f *Fleet }

func (e events) NotifyJoin(n *memberlist.Node)   { e.f.update(n, false) }
func (e events) NotifyUpdate(n *memberlist.Node) { e.f.update(n, false) }
func (e events) NotifyLeave(n *memberlist.Node)  { e.f.update(n, true) }

func (f *Fleet) update(n *memberlist.Node, gone bool) {
	var meta nodeMeta
	metaErr := json.Unmarshal(n.Meta, &meta)
	if metaErr == nil && meta.V != metaV1 {
		metaErr = fmt.Errorf("metadata version %d", meta.V)
	}
	peerAddr := ""
	if metaErr == nil {
		if metaErr = validPeerAddr(meta.Peer); metaErr == nil {
			peerAddr = meta.Peer
		}
	}
	state := StateAlive
	switch {
	case gone && (meta.Leaving || f.peerState(n.Name) == StateLeaving):
		state = StateLeft
	case gone:
		state = StateDead
	case meta.Leaving:
		state = StateLeaving
	}
	now := time.Now()
	f.mu.Lock()
	p := f.peers[n.Name]
	if p == nil {
		p = &peer{Member: Member{Name: n.Name}}
		f.peers[n.Name] = p
	}
	prev := p.State
	p.GossipAddr = n.Address()
	p.PeerAddr = peerAddr
	if p.State != state || p.since.IsZero() {
		p.State, p.since = state, now
	}
	self := p.Self
	alone := gone && f.aloneLocked()
	f.mu.Unlock()
	if alone {
		select {
		case f.wakeJoin <- struct{}{}:
		default:
		}
	}
	if self {
		return
	}
	if metaErr != nil {
		f.log.Warn("fleet member without a usable peer address; not asking it for chunks", "peer", n.Name, "err", metaErr)
	}
	if prev != state {
		f.log.Info("fleet member "+string(state), "peer", n.Name, "gossip", p.GossipAddr, "peer_addr", peerAddr)
	}
}

func (f *Fleet) peerState(name string) State {
	f.mu.Lock()
	defer f.mu.Unlock()
	if p := f.peers[name]; p != nil {
		return p.State
	}
	return ""
}

func (f *Fleet) aloneLocked() bool {
	for _, p := range f.peers {
		if !p.Self && p.State == StateAlive {
			return false
		}
	}
	return true
}

// peerRecord returns the record for name (nil if unknown).
func (f *Fleet) peerRecord(name string) *peer {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.peers[name]
}

func (f *Fleet) softFailure(name string) {
	f.mu.Lock()
	if p := f.peers[name]; p != nil && !p.Self {
		p.softFailure(time.Now(), f.cfg.health)
	}
	f.mu.Unlock()
}

func (f *Fleet) fetchOK(name string) {
	f.mu.Lock()
	if p := f.peers[name]; p != nil {
		p.success()
	}
	f.mu.Unlock()
}

// validPeerAddr accepts a peer API address as members advertise it: host:port, the host a
// DNS name or an IP address that can be dialled. A member's metadata is its own word, and
// requests signed with the fleet key go to this address: nothing in it may reach past the
// host and port into the URL (a path, a query, user info).
func validPeerAddr(addr string) error {
	bad := func(why string) error { return fmt.Errorf("%q: %s", addr, why) }
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return bad("want host:port")
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != port {
		return bad("bad port")
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" || ip.IsUnspecified() || ip.IsMulticast() {
			return bad("not an address the others can dial")
		}
		return nil
	}
	if regname.Check(host) != nil {
		return bad("want a lower-case DNS name or an IP address")
	}
	return nil
}
