// Package server assembles node-mirror's HTTP server: the /v2/ mirror behind access
// logging, metrics and optional client authentication, health and readiness endpoints,
// and the timeouts that keep hostile or broken clients from holding resources.
package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/node-mirror/node-mirror/internal/countwriter"
	"github.com/node-mirror/node-mirror/internal/wire"
	"github.com/node-mirror/node-mirror/pkg/metrics"
	"github.com/node-mirror/node-mirror/pkg/mirror"
)

// Options configure a Server.
type Options struct {
	// Listen is the configured main address; on loopback, requests must name the mirror
	// by a loopback host (see hostGuard). Empty (a handler served by a test) checks none.
	Listen string
	Mirror http.Handler
	// Admin, when set, serves /admin/ (status, gc) on the main port, behind Auth.
	Admin   http.Handler
	Metrics *metrics.Metrics
	// MetricsHandler, when set, is served at /metrics on the main port, behind Auth.
	MetricsHandler http.Handler
	Logger         *slog.Logger
	// Auth, when set, must accept a request before it reaches the mirror.
	Auth Authenticator
	// ReadHeaderTimeout closes connections that send no complete request headers in time
	// (idle floods, slowloris). Default 10s.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes keep-alive connections with no request. Default 2m.
	IdleTimeout time.Duration
	// MaxHeaderBytes bounds request line and headers. Default 64 KiB.
	MaxHeaderBytes int
}

// Authenticator decides whether a request carries valid client credentials: nil when it
// does, ErrBusy when they cannot be checked now, another error when they are wrong.
type Authenticator interface {
	Authenticate(r *http.Request) error
	// Challenge is the WWW-Authenticate value sent with a 401.
	Challenge() string
}

// Server is the mirror's HTTP server.
type Server struct {
	opts  Options
	http  *http.Server
	ready atomic.Bool
	log   *slog.Logger
}

// New builds a Server; it is not ready until SetReady(true).
func New(o Options) *Server {
	if o.ReadHeaderTimeout <= 0 {
		o.ReadHeaderTimeout = 10 * time.Second
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 2 * time.Minute
	}
	if o.MaxHeaderBytes <= 0 {
		o.MaxHeaderBytes = 64 << 10
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	s := &Server{opts: o, log: o.Logger}
	s.http = s.newHTTP(s.Handler())
	return s
}

func (s *Server) newHTTP(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: s.opts.ReadHeaderTimeout,
		IdleTimeout:       s.opts.IdleTimeout,
		MaxHeaderBytes:    s.opts.MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.opts.Logger.Handler(), slog.LevelDebug),
	}
}

// Side returns an HTTP server for a side listener (metrics, pprof) on listen, with the
// main server's timeouts, Host check and client authentication. The caller serves and
// closes it.
func (s *Server) Side(listen string, h http.Handler) *http.Server {
	return s.newHTTP(s.hostGuard(listen, s.authenticate(h)))
}

// Handler routes health, readiness, metrics and admin, and everything else to the
// mirror. Health and readiness say only "ok" and are open to every probe; everything
// else is behind the Host check and Auth.
func (s *Server) Handler() http.Handler {
	guarded := http.NewServeMux()
	if s.opts.MetricsHandler != nil {
		guarded.Handle("GET /metrics", s.authenticate(s.opts.MetricsHandler))
	}
	if s.opts.Admin != nil {
		guarded.Handle("/admin/", s.authenticate(s.opts.Admin))
	}
	guarded.Handle("/", s.observe(s.authenticate(s.opts.Mirror)))

	mux := http.NewServeMux()
	mux.Handle("/", s.hostGuard(s.opts.Listen, guarded))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !s.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	return mux
}

// SetReady flips /readyz.
func (s *Server) SetReady(ok bool) { s.ready.Store(ok) }

// Serve accepts connections on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error { return s.http.Serve(ln) }

// ServeTLS is Serve with TLS from the given files.
func (s *Server) ServeTLS(ln net.Listener, cert, key string) error {
	return s.http.ServeTLS(ln, cert, key)
}

// Shutdown stops accepting, reports not ready, and waits for requests in flight.
func (s *Server) Shutdown(ctx context.Context) error {
	s.SetReady(false)
	return s.http.Shutdown(ctx)
}

func (s *Server) authenticate(next http.Handler) http.Handler {
	if s.opts.Auth == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch err := s.opts.Auth.Authenticate(r); {
		case err == nil:
			next.ServeHTTP(w, r)
		case errors.Is(err, ErrBusy):
			// Not logged one by one: a flood of these is what the cap is for.
			wire.Write(w, r, wire.TooManyRequests.With("too many credential checks in progress, try again").
				WithHeader("Retry-After", "1"))
		default:
			s.opts.Metrics.AuthFailure()
			s.log.Warn("client authentication failed", "remote", r.RemoteAddr, "path", r.URL.Path)
			w.Header().Set("WWW-Authenticate", s.opts.Auth.Challenge())
			wire.Write(w, r, wire.Unauthorized)
		}
	})
}

// observe writes one access log line and the request metrics per request.
func (s *Server) observe(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		ctx, out := mirror.WithOutcome(r.Context())
		rec := &recorder{Writer: countwriter.New(w), status: http.StatusOK}
		defer func() {
			// A handler that aborts (panic(http.ErrAbortHandler)) is still logged.
			dur := time.Since(start)
			if out.Registry != "" {
				s.opts.Metrics.Request(out.Registry, out.Kind, out.Result)
				source := "cache"
				if out.Result == mirror.ResultMiss || out.Result == mirror.ResultPassThrough {
					source = "upstream"
				}
				s.opts.Metrics.Served(source, rec.N)
			}
			s.log.Info("request", "method", r.Method, "path", r.URL.Path, "registry", out.Registry,
				"repo", out.Repo, "kind", out.Kind, "ref", out.Ref, "status", rec.status,
				"bytes", rec.N, "duration_ms", dur.Milliseconds(), "result", out.Result, "remote", r.RemoteAddr)
		}()
		next.ServeHTTP(rec, r.WithContext(ctx))
	})
}

// recorder notes the status and, through countwriter, the body bytes.
type recorder struct {
	*countwriter.Writer
	status      int
	wroteHeader bool
}

func (r *recorder) WriteHeader(code int) {
	if !r.wroteHeader && r.N == 0 {
		r.status, r.wroteHeader = code, true
	}
	r.ResponseWriter.WriteHeader(code)
}
