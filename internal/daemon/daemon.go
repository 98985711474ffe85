// Package daemon is `node-mirror serve`: it opens the store, builds the upstream clients,
// the mirror and its HTTP server, binds the listeners, serves until told to stop, and
// applies a changed configuration on reload. The command only turns flags into Options.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/node-mirror/node-mirror/internal/sdnotify"
	"github.com/node-mirror/node-mirror/pkg/admin"
	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/fleet"
	"github.com/node-mirror/node-mirror/pkg/metrics"
	"github.com/node-mirror/node-mirror/pkg/mirror"
	"github.com/node-mirror/node-mirror/pkg/server"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

// Options configure a Daemon. Only what Load returns can change on reload.
type Options struct {
	// Load returns the configuration (file and flag overrides), at start and on every
	// reload, so a reload sees the same overrides.
	Load func() (config.Config, error)
	// Auth, when set, is required of every client (pulls, admin, metrics, pprof).
	Auth server.Authenticator
	// TLSCert and TLSKey, when set, make every listener serve HTTPS.
	TLSCert, TLSKey string
	// InsecurePublicListen allows listeners beyond loopback without TLS and Auth.
	InsecurePublicListen bool
	// MetricsListen serves /metrics there instead of on the main port.
	MetricsListen string
	// DebugListen serves Go's pprof there.
	DebugListen string
	// ReadyFile, when set, receives the bound main address (host:port and a newline)
	// once the daemon serves, so whoever started it with port 0 can find it.
	ReadyFile string
	// Version goes into the upstream User-Agent.
	Version string
	Logger  *slog.Logger
	// ShutdownTimeout bounds the wait for responses in flight at shutdown (default 30s).
	ShutdownTimeout time.Duration
}

// Daemon is a running mirror with its listeners bound.
type Daemon struct {
	opts   Options
	log    *slog.Logger
	store  *contentstore.Store
	met    *metrics.Metrics
	mirror *mirror.Mirror
	srv    *server.Server
	main   net.Listener
	sides  []side
	fleet  *fleet.Fleet // nil unless fleet mode is configured
	peerLn net.Listener
	// wroteReady: the ready file is this process's to remove. A daemon that never got
	// that far (another one holds the port) must not remove the running one's.
	wroteReady bool

	mu  sync.Mutex    // serialises reloads
	cfg config.Config // the configuration applied last
}

// side is a side listener (metrics, pprof) and its server.
type side struct {
	flag string
	ln   net.Listener
	srv  *http.Server
}

// New loads the configuration, checks what it would expose, opens the store and binds
// every listener. Nothing is served until Run.
func New(o Options) (*Daemon, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.ShutdownTimeout <= 0 {
		o.ShutdownTimeout = 30 * time.Second
	}
	if (o.TLSCert == "") != (o.TLSKey == "") {
		return nil, errors.New("--tls-cert and --tls-key go together")
	}
	cfg, err := o.Load()
	if err != nil {
		return nil, err
	}
	tls, auth := o.TLSCert != "", o.Auth != nil
	if err := server.CheckExposure("listen", cfg.Listen, tls, auth, o.InsecurePublicListen); err != nil {
		return nil, err
	}
	if o.MetricsListen != "" {
		if err := server.CheckExposure("metrics-listen", o.MetricsListen, tls, auth, o.InsecurePublicListen); err != nil {
			return nil, err
		}
	}
	if o.DebugListen != "" {
		if err := server.CheckDebugExposure(o.DebugListen, o.InsecurePublicListen); err != nil {
			return nil, err
		}
	}

	d := &Daemon{opts: o, log: o.Logger, cfg: cfg}
	built := false
	defer func() {
		if !built {
			d.close()
		}
	}()
	if d.store, err = contentstore.Open(cfg.DataDir); err != nil {
		return nil, err
	}
	d.store.SetBudget(Budget(cfg))

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	d.met = metrics.New(reg, func() (int64, int) {
		b, n, _ := d.store.Usage(context.Background())
		return b, n
	})
	metrics.RegisterCache(reg, d.store.CacheCounters)
	regs, err := d.newClients(cfg)
	if err != nil {
		return nil, err
	}
	if cfg.Fleet.Enabled() {
		if err := d.startFleet(cfg, reg); err != nil {
			return nil, err
		}
	}
	mo := mirrorOptions(cfg, regs)
	mo.Store, mo.Logger, mo.Metrics, mo.Fleet = d.store, d.log, d.met, d.fleet
	mo.FetchConcurrency = cfg.Cache.FetchConcurrency
	mo.FetchChunkSize = cfg.Cache.FetchChunkSize.Bytes
	mo.UpstreamConnections = cfg.Cache.UpstreamConnections
	if d.mirror, err = mirror.New(mo); err != nil {
		return nil, err
	}

	metricsHandler := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	so := server.Options{Listen: cfg.Listen, Mirror: d.mirror, Admin: admin.Handler(d.mirror, d.fleet, d.log),
		Metrics: d.met, Logger: d.log, Auth: o.Auth}
	if o.MetricsListen == "" {
		so.MetricsHandler = metricsHandler
	}
	d.srv = server.New(so)
	if d.main, err = net.Listen("tcp", cfg.Listen); err != nil {
		return nil, err
	}
	for _, s := range []struct {
		flag, addr string
		h          http.Handler
	}{{"metrics-listen", o.MetricsListen, metricsHandler}, {"debug-listen", o.DebugListen, debugMux()}} {
		if s.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", s.addr)
		if err != nil {
			return nil, fmt.Errorf("--%s: %w", s.flag, err)
		}
		d.sides = append(d.sides, side{flag: s.flag, ln: ln, srv: d.srv.Side(s.addr, s.h)})
	}
	built = true
	return d, nil
}

// startFleet joins the fleet and binds the peer API. The peer listener may face the
// network: it serves members only, and every request is signed with the fleet key.
func (d *Daemon) startFleet(cfg config.Config, reg prometheus.Registerer) error {
	fc := cfg.Fleet
	key, err := fleet.LoadKey(fc.KeyFile) // its errors name the file
	if err != nil {
		return err
	}
	if d.peerLn, err = net.Listen("tcp", fc.PeerListen); err != nil {
		return fmt.Errorf("--peer-listen: %w", err)
	}
	adv := fc.PeerAdvertise
	if adv == "" {
		adv = d.peerLn.Addr().String()
		if host, _, _ := net.SplitHostPort(adv); net.ParseIP(host) != nil && net.ParseIP(host).IsUnspecified() {
			return fmt.Errorf("--peer-listen %s listens on every address: say which one the others dial with --peer-advertise", fc.PeerListen)
		}
	}
	d.fleet, err = fleet.Start(context.Background(), fleet.Config{
		NodeName: fc.NodeName, GossipListen: fc.GossipListen, PeerAdvertise: adv, Join: fc.Join, Key: key,
		Logger: d.log, Registerer: reg, MaxManifestSize: cfg.Cache.MaxManifestSize,
		// What a member may ask is what fetch_chunk_size may be: the two bounds are one.
		MaxChunkSize: config.MaxFetchChunkSize,
		PeerTLS:      fleet.PeerTLS{Cert: fc.PeerTLSCert, Key: fc.PeerTLSKey, CA: fc.PeerTLSCA},
	})
	if err != nil {
		return fmt.Errorf("joining the fleet: %w", err)
	}
	return nil
}

// Addr is the bound main address (the port is known here when --listen asked for 0).
func (d *Daemon) Addr() string { return d.main.Addr().String() }

// Run serves until ctx is done, then shuts down gracefully: requests in flight finish
// (ShutdownTimeout at most) and downloads leave the store consistent. Each value on
// reload re-reads the configuration. A listener that fails ends Run with its error.
func (d *Daemon) Run(ctx context.Context, reload <-chan os.Signal) error {
	defer d.close()
	// Background work on the store stops, and is waited for, before the store closes.
	bg, stopBG := context.WithCancel(context.Background())
	var bgWork sync.WaitGroup
	defer func() {
		stopBG()
		bgWork.Wait()
	}()
	// Room for every server's error (main, peer API, side listeners): one that fails
	// after Run returned must not block forever.
	errc := make(chan error, 2+len(d.sides))
	serve := func(name string, s interface {
		Serve(net.Listener) error
		ServeTLS(net.Listener, string, string) error
	}, ln net.Listener) {
		var err error
		if d.opts.TLSCert != "" {
			err = s.ServeTLS(ln, d.opts.TLSCert, d.opts.TLSKey)
		} else {
			err = s.Serve(ln)
		}
		if !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("%s: %w", name, err)
		}
	}
	go serve("listen", d.srv, d.main)
	if d.fleet != nil {
		go func() {
			if err := d.fleet.Serve(d.peerLn, d.mirror); !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("peer-listen: %w", err)
			}
		}()
		d.log.Info("serving the fleet's peer API", "peer_listen", d.peerLn.Addr().String(), "gossip", d.fleet.GossipAddr(), "node", d.fleet.Name())
	}
	for _, s := range d.sides {
		go serve(s.flag, s.srv, s.ln)
		d.log.Info("serving "+s.flag, "listen", s.ln.Addr().String())
	}
	bgWork.Go(func() { flushAccess(bg, d.store, d.log) })
	bgWork.Go(func() {
		d.store.Janitor(bg, time.Minute, func(rep contentstore.GCReport, err error) {
			if err != nil {
				d.log.Warn("cache collection failed", "err", err)
				return
			}
			d.log.Info("cache collected", "evicted", len(rep.Evicted), "orphans", len(rep.Orphans),
				"freed_bytes", rep.FreedBytes, "usage_bytes", rep.UsageAfter)
		})
	})

	d.srv.SetReady(true)
	if err := sdnotify.Ready(); err != nil {
		d.log.Warn("telling systemd we are ready", "err", err)
	}
	if err := d.writeReadyFile(); err != nil {
		return err
	}
	d.log.Info("serving", "listen", d.Addr(), "data_dir", d.cfg.DataDir, "registries", registryNames(d.cfg), "default", d.cfg.DefaultRegistry)

	var runErr error
loop:
	for {
		select {
		case runErr = <-errc:
			break loop
		case <-reload:
			d.Reload()
		case <-ctx.Done():
			break loop
		}
	}
	d.log.Info("shutting down")
	sdnotify.Stopping()
	sctx, cancel := context.WithTimeout(context.Background(), d.opts.ShutdownTimeout)
	defer cancel()
	if err := d.srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) && runErr == nil {
		runErr = err
	}
	return runErr
}

// Reload applies the configuration Load returns now. A configuration that does not load
// or apply changes nothing: the running one stays, and the error is logged and
// returned. Everything but listen and data_dir takes effect.
func (d *Daemon) Reload() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	cfg, err := d.opts.Load()
	if err == nil {
		var regs map[string]*upstream.Client
		if regs, err = d.newClients(cfg); err == nil {
			err = d.mirror.Reconfigure(mirrorOptions(cfg, regs))
		}
	}
	d.met.ConfigReload(err == nil)
	if err != nil {
		d.log.Error("config reload rejected, keeping the running configuration", "err", err)
		return err
	}
	d.store.SetBudget(Budget(cfg))
	var restart []string
	if cfg.Listen != d.cfg.Listen {
		restart = append(restart, "listen")
	}
	if cfg.DataDir != d.cfg.DataDir {
		restart = append(restart, "data_dir")
	}
	if !reflect.DeepEqual(cfg.Fleet, d.cfg.Fleet) { // every [fleet] key, node_name and TLS files included
		restart = append(restart, "fleet")
	}
	if cfg.Cache.FetchConcurrency != d.cfg.Cache.FetchConcurrency || cfg.Cache.FetchChunkSize != d.cfg.Cache.FetchChunkSize ||
		cfg.Cache.UpstreamConnections != d.cfg.Cache.UpstreamConnections {
		restart = append(restart, "fetch_concurrency, fetch_chunk_size, upstream_connections")
	}
	if len(restart) > 0 {
		d.log.Warn("these keys take effect on restart; the running values stay", "keys", restart,
			"listen", d.cfg.Listen, "data_dir", d.cfg.DataDir)
	}
	cfg.Listen, cfg.DataDir = d.cfg.Listen, d.cfg.DataDir
	cfg.Fleet, cfg.Cache.FetchConcurrency = d.cfg.Fleet, d.cfg.Cache.FetchConcurrency
	cfg.Cache.FetchChunkSize, cfg.Cache.UpstreamConnections = d.cfg.Cache.FetchChunkSize, d.cfg.Cache.UpstreamConnections
	d.cfg = cfg
	d.log.Info("config reloaded", "registries", registryNames(cfg), "default", cfg.DefaultRegistry,
		"tag_freshness", cfg.Cache.TagFreshness.Duration, "list_ttl", cfg.Cache.ListTTL.Duration,
		"max_manifest_size", cfg.Cache.MaxManifestSize, "eager_fetch", cfg.Cache.EagerFetch)
	return nil
}

// close releases what New opened, in the order that keeps the store consistent: the
// listeners, then the mirror's downloads, then the store.
func (d *Daemon) close() {
	if d.fleet != nil {
		// Leave first: the others stop asking this node while the chunks it serves finish.
		d.fleet.Close()
	} else if d.peerLn != nil {
		d.peerLn.Close()
	}
	for _, s := range d.sides {
		s.srv.Close()
		s.ln.Close()
	}
	if d.main != nil {
		d.main.Close()
	}
	if d.mirror != nil {
		d.mirror.Close()
	}
	if d.store != nil {
		d.store.Close()
	}
	if d.wroteReady {
		os.Remove(d.opts.ReadyFile)
	}
}

// writeReadyFile writes the address whole or not at all: a reader polling for the file
// never sees half of it.
func (d *Daemon) writeReadyFile() error {
	if d.opts.ReadyFile == "" {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(d.opts.ReadyFile), ".ready-*")
	if err != nil {
		return fmt.Errorf("--ready-file: %w", err)
	}
	_, err = tmp.WriteString(d.Addr() + "\n")
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), d.opts.ReadyFile)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("--ready-file: %w", err)
	}
	d.wroteReady = true
	return nil
}

func (d *Daemon) newClients(cfg config.Config) (map[string]*upstream.Client, error) {
	regs := map[string]*upstream.Client{}
	for _, r := range cfg.Registries {
		epCreds := map[string]upstream.Credentials{}
		for _, ec := range r.EndpointCredentials {
			epCreds[ec.Host] = upstream.Credentials{Username: ec.Username, Password: ec.Password}
		}
		cl, err := upstream.New(r.Name, r.Endpoints, r.Username, r.Password, upstream.Options{
			UserAgent: "node-mirror/" + d.opts.Version, Logger: d.log, Observe: d.met.ObserveUpstream(r.Name),
			EndpointCredentials: epCreds, TrustedHosts: r.TrustedHosts,
		})
		if err != nil {
			return nil, err
		}
		regs[r.Name] = cl
	}
	return regs, nil
}

// mirrorOptions are the reloadable mirror options a configuration sets.
func mirrorOptions(cfg config.Config, regs map[string]*upstream.Client) mirror.Options {
	return mirror.Options{
		Registries:      regs,
		DefaultRegistry: cfg.DefaultRegistry,
		TagFreshness:    cfg.Cache.TagFreshness.Duration,
		ListTTL:         cfg.Cache.ListTTL.Duration,
		MaxManifestSize: cfg.Cache.MaxManifestSize,
		EagerFetch:      cfg.Cache.EagerFetch,
	}
}

// Budget is the store budget a configuration sets; gc and status use it on a data dir
// without a daemon.
func Budget(cfg config.Config) contentstore.Budget {
	return contentstore.Budget{
		MaxBytes: cfg.Cache.MaxSize.Bytes, MaxPercent: cfg.Cache.MaxSize.Percent,
		MinFreeBytes: cfg.Cache.MinFree.Bytes, MinFreePercent: cfg.Cache.MinFree.Percent,
		OrphanGrace: cfg.Cache.OrphanGrace.Duration,
	}
}

func registryNames(cfg config.Config) []string {
	names := make([]string, 0, len(cfg.Registries))
	for _, r := range cfg.Registries {
		names = append(names, r.Name)
	}
	return names
}

// debugMux serves net/http/pprof without registering it on the default mux.
func debugMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// flushAccess persists last-access times in batches, off the request path.
func flushAccess(ctx context.Context, store *contentstore.Store, log *slog.Logger) {
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := store.FlushAccess(); err != nil {
				log.Warn("flushing access times", "err", err)
			}
		}
	}
}
