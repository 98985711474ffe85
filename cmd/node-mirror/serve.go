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

	"github.com/urfave/cli/v2"

	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/contentstore"
	"github.com/node-mirror/node-mirror/pkg/mirror"
	"github.com/node-mirror/node-mirror/pkg/upstream"
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the pull-through mirror",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", Usage: "TOML config `FILE`"},
			&cli.StringFlag{Name: "listen", Usage: "address to listen on (default 127.0.0.1:5000)"},
			&cli.StringFlag{Name: "data-dir", Usage: "where the cache lives (default /var/lib/node-mirror)"},
			&cli.StringSliceFlag{Name: "upstream", Usage: "`NAME=URL`: mirror registry NAME (as clients name it) from URL; repeatable, replaces the configured registries"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.StringFlag{Name: "debug-listen", Usage: "serve Go pprof profiles on this `ADDR` (keep it on loopback)"},
		},
		Action: serve,
	}
}

func serve(c *cli.Context) error {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	slog.SetDefault(log)

	cfg := config.Default()
	if f := c.String("config"); f != "" {
		var err error
		if cfg, err = config.Load(f); err != nil {
			return err
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
			return err
		}
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("config: %w", err)
	}

	store, err := contentstore.Open(cfg.DataDir)
	if err != nil {
		return err
	}
	defer store.Close()

	regs := map[string]*upstream.Client{}
	for _, r := range cfg.Registries {
		cl, err := upstream.New(r.Name, r.Endpoints, r.Username, r.Password, upstream.Options{
			UserAgent: "node-mirror/" + version, Logger: log,
		})
		if err != nil {
			return err
		}
		regs[r.Name] = cl
	}
	m, err := mirror.New(mirror.Options{
		Store:           store,
		Registries:      regs,
		DefaultRegistry: cfg.DefaultRegistry,
		TagFreshness:    cfg.Cache.TagFreshness.Duration,
		ListTTL:         cfg.Cache.ListTTL.Duration,
		MaxManifestSize: cfg.Cache.MaxManifestSize,
		Logger:          log,
	})
	if err != nil {
		return err
	}
	defer m.Close()

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/v2/", m)
	mux.Handle("/v2", m)
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go flushAccess(ctx, store, log)

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	if addr := c.String("debug-listen"); addr != "" {
		dln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("--debug-listen: %w", err)
		}
		dsrv := &http.Server{Handler: debugMux(), ReadHeaderTimeout: 10 * time.Second}
		defer dsrv.Close()
		go dsrv.Serve(dln)
		log.Info("serving pprof", "listen", dln.Addr().String())
	}
	names := make([]string, 0, len(cfg.Registries))
	for _, r := range cfg.Registries {
		names = append(names, r.Name)
	}
	log.Info("serving", "listen", ln.Addr().String(), "data_dir", cfg.DataDir, "registries", names, "default", cfg.DefaultRegistry)

	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
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
