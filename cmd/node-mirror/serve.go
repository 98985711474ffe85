package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/urfave/cli/v2"

	"github.com/node-mirror/node-mirror/internal/sdnotify"
	"github.com/node-mirror/node-mirror/pkg/admin"
	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/metrics"
	"github.com/node-mirror/node-mirror/pkg/mirror"
	"github.com/node-mirror/node-mirror/pkg/server"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the pull-through mirror",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", Usage: "TOML config `FILE` (reloaded on SIGHUP)"},
			&cli.StringFlag{Name: "listen", Usage: "address to listen on (default 127.0.0.1:5000)"},
			&cli.StringFlag{Name: "data-dir", Usage: "where the cache lives (default /var/lib/node-mirror)"},
			&cli.StringSliceFlag{Name: "upstream", Usage: "`NAME=URL`: mirror registry NAME (as clients name it) from URL; repeatable, replaces the configured registries"},
			&cli.StringFlag{Name: "max-size", Usage: "cache budget: `SIZE` such as 20GiB, or a percentage of the filesystem such as 10%"},
			&cli.StringFlag{Name: "min-free", Usage: "keep this much of the filesystem free: `SIZE` or percentage"},
			&cli.IntFlag{Name: "eager-fetch", Usage: "fetch up to `N` layers of a requested image ahead of the engine (0: off; default 4)"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json"},
			&cli.StringFlag{Name: "metrics-listen", Usage: "serve /metrics on this `ADDR` instead of the main port"},
			&cli.StringFlag{Name: "debug-listen", Usage: "serve Go pprof profiles on this `ADDR` (keep it on loopback)"},
			&cli.StringFlag{Name: "tls-cert", Usage: "serve HTTPS with this certificate `FILE`"},
			&cli.StringFlag{Name: "tls-key", Usage: "private key `FILE` for --tls-cert"},
			&cli.StringFlag{Name: "htpasswd", Usage: "require HTTP basic auth checked against this bcrypt htpasswd `FILE`"},
			&cli.StringFlag{Name: "token-file", Usage: "require a bearer token listed in this `FILE`"},
			&cli.BoolFlag{Name: "insecure-public-listen", Usage: "allow a non-loopback --listen without TLS and client auth"},
		},
		Action: serve,
	}
}

// loadConfig builds the configuration from the file and the flags that override it. It
// runs again on SIGHUP, so a reload sees the same overrides.
func loadConfig(c *cli.Context) (config.Config, error) {
	cfg := config.Default()
	if f := c.String("config"); f != "" {
		var err error
		if cfg, err = config.Load(f); err != nil {
			return cfg, err
		}
	}
	if v := c.String("listen"); v != "" {
		cfg.Listen = v
	}
	if v := c.String("data-dir"); v != "" {
		cfg.DataDir = v
	}
	if ups := c.StringSlice("upstream"); len(ups) > 0 {
		if err := cfg.SetUpstreams(ups); err != nil {
			return cfg, err
		}
	}
	if err := budgetFlags(c, &cfg); err != nil {
		return cfg, err
	}
	if c.IsSet("eager-fetch") {
		cfg.Cache.EagerFetch = c.Int("eager-fetch")
	}
	if err := cfg.Validate(); err != nil {
		return cfg, fmt.Errorf("config: %w", err)
	}
	return cfg, nil
}

func newLogger(c *cli.Context) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	o := &slog.HandlerOptions{Level: lvl}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, o)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, o)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", c.String("log-format"))
}

func newClients(cfg config.Config, log *slog.Logger, met *metrics.Metrics) (map[string]*upstream.Client, error) {
	regs := map[string]*upstream.Client{}
	for _, r := range cfg.Registries {
		cl, err := upstream.New(r.Name, r.Endpoints, r.Username, r.Password, upstream.Options{
			UserAgent: "node-mirror/" + version, Logger: log, Observe: met.ObserveUpstream(r.Name),
		})
		if err != nil {
			return nil, err
		}
		regs[r.Name] = cl
	}
	return regs, nil
}

func newAuth(c *cli.Context) (server.Authenticator, error) {
	switch h, t := c.String("htpasswd"), c.String("token-file"); {
	case h != "" && t != "":
		return nil, errors.New("--htpasswd and --token-file exclude each other")
	case h != "":
		return server.LoadHtpasswd(h)
	case t != "":
		return server.LoadTokenFile(t)
	}
	return nil, nil
}

func serve(c *cli.Context) error {
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	slog.SetDefault(log)
	cfg, err := loadConfig(c)
	if err != nil {
		return err
	}
	auth, err := newAuth(c)
	if err != nil {
		return err
	}
	if (c.String("tls-cert") == "") != (c.String("tls-key") == "") {
		return errors.New("--tls-cert and --tls-key go together")
	}
	tls, insecure := c.String("tls-cert") != "", c.Bool("insecure-public-listen")
	if err := server.CheckExposure("listen", cfg.Listen, tls, auth != nil, insecure); err != nil {
		return err
	}
	if addr := c.String("metrics-listen"); addr != "" {
		if err := server.CheckExposure("metrics-listen", addr, tls, auth != nil, insecure); err != nil {
			return err
		}
	}
	if addr := c.String("debug-listen"); addr != "" {
		if err := server.CheckDebugExposure(addr, insecure); err != nil {
			return err
		}
	}

	store, err := contentstore.Open(cfg.DataDir)
	if err != nil {
		return err
	}
	defer store.Close()
	store.SetBudget(budgetOf(cfg))

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	met := metrics.New(reg, func() (int64, int) {
		b, n, _ := store.Usage(context.Background())
		return b, n
	})
	metrics.RegisterCache(reg, store.CacheCounters)
	regs, err := newClients(cfg, log, met)
	if err != nil {
		return err
	}
	m, err := mirror.New(mirror.Options{
		Store:           store,
		Registries:      regs,
		DefaultRegistry: cfg.DefaultRegistry,
		TagFreshness:    cfg.Cache.TagFreshness.Duration,
		ListTTL:         cfg.Cache.ListTTL.Duration,
		MaxManifestSize: cfg.Cache.MaxManifestSize,
		EagerFetch:      eagerOf(cfg),
		Logger:          log,
		Metrics:         met,
	})
	if err != nil {
		return err
	}
	defer m.Close()

	metricsHandler := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	srvOpts := server.Options{Listen: cfg.Listen, Mirror: m, Admin: admin.Handler(m, log), Metrics: met, Logger: log, Auth: auth}
	if c.String("metrics-listen") == "" {
		srvOpts.MetricsHandler = metricsHandler
	}
	srv := server.New(srvOpts)

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	errc := make(chan error, 3)
	go func() {
		if cert := c.String("tls-cert"); cert != "" {
			errc <- srv.ServeTLS(ln, cert, c.String("tls-key"))
			return
		}
		errc <- srv.Serve(ln)
	}()
	side := map[string]http.Handler{"metrics-listen": metricsHandler, "debug-listen": debugMux()}
	for flag, h := range side {
		addr := c.String(flag)
		if addr == "" {
			continue
		}
		sln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("--%s: %w", flag, err)
		}
		s := srv.Side(addr, h)
		defer s.Close()
		go func() {
			if cert := c.String("tls-cert"); cert != "" {
				errc <- s.ServeTLS(sln, cert, c.String("tls-key"))
				return
			}
			errc <- s.Serve(sln)
		}()
		log.Info("serving "+flag, "listen", sln.Addr().String())
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go flushAccess(ctx, store, log)
	go store.Janitor(ctx, time.Minute, func(rep contentstore.GCReport, err error) {
		if err != nil {
			log.Warn("cache collection failed", "err", err)
			return
		}
		log.Info("cache collected", "evicted", len(rep.Evicted), "orphans", len(rep.Orphans),
			"freed_bytes", rep.FreedBytes, "usage_bytes", rep.UsageAfter)
	})
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	srv.SetReady(true)
	if err := sdnotify.Ready(); err != nil {
		log.Warn("telling systemd we are ready", "err", err)
	}
	log.Info("serving", "listen", ln.Addr().String(), "data_dir", cfg.DataDir, "registries", registryNames(cfg), "default", cfg.DefaultRegistry)

	for {
		select {
		case err := <-errc:
			return err
		case <-hup:
			reload(c, cfg, m, log, met)
			continue
		case <-ctx.Done():
		}
		break
	}
	log.Info("shutting down")
	sdnotify.Stopping()
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
}

// reload applies a changed config file. A broken file changes nothing: the old
// configuration stays and the error is logged. Listen address and data dir need a restart.
func reload(c *cli.Context, running config.Config, m *mirror.Mirror, log *slog.Logger, met *metrics.Metrics) {
	cfg, err := loadConfig(c)
	if err == nil {
		var regs map[string]*upstream.Client
		if regs, err = newClients(cfg, log, met); err == nil {
			err = m.Reconfigure(mirror.Options{Registries: regs, DefaultRegistry: cfg.DefaultRegistry,
				TagFreshness: cfg.Cache.TagFreshness.Duration, ListTTL: cfg.Cache.ListTTL.Duration,
				MaxManifestSize: cfg.Cache.MaxManifestSize, EagerFetch: eagerOf(cfg)})
		}
	}
	if err == nil {
		m.Store().SetBudget(budgetOf(cfg))
	}
	met.ConfigReload(err == nil)
	if err != nil {
		log.Error("config reload rejected, keeping the running configuration", "err", err)
		return
	}
	if cfg.Listen != running.Listen || cfg.DataDir != running.DataDir {
		log.Warn("listen and data_dir changes take effect on restart")
	}
	log.Info("config reloaded", "registries", registryNames(cfg), "default", cfg.DefaultRegistry)
}

// budgetFlags applies --max-size and --min-free over the config file.
func budgetFlags(c *cli.Context, cfg *config.Config) error {
	for flag, dst := range map[string]*config.Size{"max-size": &cfg.Cache.MaxSize, "min-free": &cfg.Cache.MinFree} {
		if v := c.String(flag); v != "" {
			sz, err := config.ParseSize(v)
			if err != nil {
				return fmt.Errorf("--%s: %w", flag, err)
			}
			*dst = sz
		}
	}
	return nil
}

func budgetOf(cfg config.Config) contentstore.Budget {
	return contentstore.Budget{
		MaxBytes: cfg.Cache.MaxSize.Bytes, MaxPercent: cfg.Cache.MaxSize.Percent,
		MinFreeBytes: cfg.Cache.MinFree.Bytes, MinFreePercent: cfg.Cache.MinFree.Percent,
		OrphanGrace: cfg.Cache.OrphanGrace.Duration,
	}
}

func eagerOf(cfg config.Config) int { return cfg.Cache.EagerFetch }

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
