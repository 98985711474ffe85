package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/node-mirror/node-mirror/internal/daemon"
	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/server"
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
			&cli.StringFlag{Name: "metrics-listen", Usage: "serve /metrics on this `ADDR` instead of the main port (same exposure rule and client auth as --listen)"},
			&cli.StringFlag{Name: "debug-listen", Usage: "serve Go pprof profiles on this `ADDR` (loopback, unless --insecure-public-listen)"},
			&cli.StringFlag{Name: "tls-cert", Usage: "serve HTTPS with this certificate `FILE`"},
			&cli.StringFlag{Name: "tls-key", Usage: "private key `FILE` for --tls-cert"},
			&cli.StringFlag{Name: "htpasswd", Usage: "require HTTP basic auth checked against this bcrypt htpasswd `FILE`"},
			&cli.StringFlag{Name: "token-file", Usage: "require a bearer token listed in this `FILE`"},
			&cli.BoolFlag{Name: "insecure-public-listen", Usage: "allow listeners beyond loopback without TLS and client auth"},
			&cli.StringFlag{Name: "ready-file", Usage: "once serving, write the bound listen address to `FILE` (for --listen with port 0)"},
			&cli.IntFlag{Name: "fetch-concurrency", Usage: "fetch a cold blob over up to `N` connections when its upstream answers ranges (1: one stream; default 4)"},
			&cli.StringFlag{Name: "fetch-chunk-size", Usage: "ranges of `SIZE` for those fetches, and the fleet's unit of ownership (default 16MiB)"},
			&cli.StringFlag{Name: "peer-listen", Usage: "fleet: serve the peer API (chunks and manifests, to members only) on `HOST:PORT`; turns fleet mode on"},
			&cli.StringFlag{Name: "peer-advertise", Usage: "fleet: the peer API address the others dial (default: --peer-listen)"},
			&cli.StringFlag{Name: "gossip-listen", Usage: "fleet: memberlist's `HOST:PORT`, TCP and UDP"},
			&cli.StringSliceFlag{Name: "join", Usage: "fleet: gossip `ADDR`s or DNS names of members, comma-separated; retried until one answers"},
			&cli.StringFlag{Name: "fleet-key-file", Usage: "fleet: `FILE` with the 32-byte key (64 hex digits) that encrypts gossip and signs peer requests"},
			&cli.StringFlag{Name: "node-name", Usage: "fleet: this member's `NAME` (default: the host name)"},
			&cli.StringFlag{Name: "peer-tls-cert", Usage: "fleet: serve the peer API over TLS with this certificate `FILE`"},
			&cli.StringFlag{Name: "peer-tls-key", Usage: "fleet: private key `FILE` for --peer-tls-cert"},
			&cli.StringFlag{Name: "peer-tls-ca", Usage: "fleet: CA `FILE` the members' peer certificates are checked against (default: system roots)"},
		},
		Action: serve,
	}
}

func serve(c *cli.Context) error {
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	slog.SetDefault(log)
	auth, err := newAuth(c)
	if err != nil {
		return err
	}
	d, err := daemon.New(daemon.Options{
		Load:                 func() (config.Config, error) { return loadConfig(c) },
		Auth:                 auth,
		TLSCert:              c.String("tls-cert"),
		TLSKey:               c.String("tls-key"),
		InsecurePublicListen: c.Bool("insecure-public-listen"),
		MetricsListen:        c.String("metrics-listen"),
		DebugListen:          c.String("debug-listen"),
		ReadyFile:            c.String("ready-file"),
		Version:              version,
		Logger:               log,
	})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	return d.Run(ctx, hup)
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
	if c.IsSet("fetch-concurrency") {
		cfg.Cache.FetchConcurrency = c.Int("fetch-concurrency")
	}
	if v := c.String("fetch-chunk-size"); v != "" {
		sz, err := config.ParseSize(v)
		if err != nil {
			return cfg, fmt.Errorf("--fetch-chunk-size: %w", err)
		}
		cfg.Cache.FetchChunkSize = sz
	}
	fleetFlags(c, &cfg.Fleet)
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

// fleetFlags applies the fleet flags over the config file's [fleet].
func fleetFlags(c *cli.Context, f *config.Fleet) {
	for flag, dst := range map[string]*string{
		"peer-listen": &f.PeerListen, "peer-advertise": &f.PeerAdvertise, "gossip-listen": &f.GossipListen,
		"fleet-key-file": &f.KeyFile, "node-name": &f.NodeName,
		"peer-tls-cert": &f.PeerTLSCert, "peer-tls-key": &f.PeerTLSKey, "peer-tls-ca": &f.PeerTLSCA,
	} {
		if v := c.String(flag); v != "" {
			*dst = v
		}
	}
	if j := c.StringSlice("join"); len(j) > 0 {
		f.Join = nil
		for _, v := range j {
			for _, a := range strings.Split(v, ",") {
				if a = strings.TrimSpace(a); a != "" {
					f.Join = append(f.Join, a)
				}
			}
		}
	}
}
