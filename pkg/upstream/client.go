// Package upstream talks to the real registries behind the mirror: endpoints tried in
// order, token and basic auth (containerd's authorizer), retries with backoff that honour
// Retry-After, and timeouts on connect and on stalled bodies.
package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
)

// ErrNotFound means the upstream answered 404 for the name, tag or digest.
var ErrNotFound = errors.New("not found upstream")

// StatusError is an upstream answer that is neither success nor 404.
type StatusError struct {
	Endpoint   string
	Status     int
	RetryAfter time.Duration
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("upstream %s answered %d %s", e.Endpoint, e.Status, http.StatusText(e.Status))
}

// Options tune a Client. Zero values mean the defaults.
type Options struct {
	// Transport replaces the default transport (tests inject faults here).
	Transport http.RoundTripper
	// MaxAttempts per endpoint for 5xx, 429 and network errors (default 3).
	MaxAttempts int
	// MaxRetryAfter caps how long a Retry-After is waited for; a longer one fails fast so
	// the caller can serve stale content instead of hanging the engine (default 10s).
	MaxRetryAfter time.Duration
	// StallTimeout aborts a body that delivers no bytes for this long (default 30s).
	StallTimeout time.Duration
	// HeaderTimeout bounds the wait for response headers with the default transport
	// (default 30s).
	HeaderTimeout time.Duration
	// BaseBackoff is the first retry delay, doubled per attempt (default 200ms).
	BaseBackoff time.Duration
	UserAgent   string
	Logger      *slog.Logger
	// Observe, when set, sees every HTTP exchange (resp nil on a network error), for metrics.
	Observe func(resp *http.Response, d time.Duration, err error)
}

// Client reaches one registry through its endpoints. Safe for concurrent use.
type Client struct {
	name      string
	endpoints []*url.URL
	http      *http.Client
	newAuth   func() docker.Authorizer
	opts      Options
	log       *slog.Logger

	mu   sync.Mutex
	auth docker.Authorizer
}

// NewTransport is the transport used for upstream traffic: bounded connect, TLS and
// header waits, since a hung registry must not hang pulls indefinitely.
func NewTransport() *http.Transport {
	d := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           d.DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          100,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// New returns a client for the registry called name, reached at endpoints in order.
func New(name string, endpoints []string, username, password string, opts Options) (*Client, error) {
	if len(endpoints) == 0 {
		return nil, fmt.Errorf("registry %s: no endpoints", name)
	}
	c := &Client{name: name, opts: opts}
	for _, e := range endpoints {
		u, err := url.Parse(strings.TrimSuffix(e, "/"))
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("registry %s: bad endpoint %q", name, e)
		}
		c.endpoints = append(c.endpoints, u)
	}
	if c.opts.MaxAttempts <= 0 {
		c.opts.MaxAttempts = 3
	}
	if c.opts.MaxRetryAfter <= 0 {
		c.opts.MaxRetryAfter = 10 * time.Second
	}
	if c.opts.StallTimeout <= 0 {
		c.opts.StallTimeout = 30 * time.Second
	}
	if c.opts.BaseBackoff <= 0 {
		c.opts.BaseBackoff = 200 * time.Millisecond
	}
	if c.opts.UserAgent == "" {
		c.opts.UserAgent = "node-mirror"
	}
	c.log = c.opts.Logger
	if c.log == nil {
		c.log = slog.Default()
	}
	rt := c.opts.Transport
	if rt == nil {
		t := NewTransport()
		if c.opts.HeaderTimeout > 0 {
			t.ResponseHeaderTimeout = c.opts.HeaderTimeout
		}
		rt = t
	}
	c.http = &http.Client{Transport: rt}
	c.newAuth = func() docker.Authorizer {
		return docker.NewDockerAuthorizer(
			docker.WithAuthClient(c.http),
			docker.WithAuthCreds(func(string) (string, string, error) { return username, password, nil }),
		)
	}
	c.auth = c.newAuth()
	return c, nil
}

// CloseIdleConnections releases pooled connections (on reload and shutdown).
func (c *Client) CloseIdleConnections() { c.http.CloseIdleConnections() }

// Name is the registry's name as clients use it.
func (c *Client) Name() string { return c.name }

// Request describes one call to /v2/<Repo>/<Path> (Path e.g. "manifests/latest").
type Request struct {
	Method string
	Repo   string
	Path   string
	Query  url.Values
	Header http.Header
	// Attempts overrides Options.MaxAttempts; 1 means no retries (used when a cached
	// answer can be served instead).
	Attempts int
}

// Do sends r to each endpoint in order until one answers 2xx. The error of the last
// endpoint tried is returned otherwise: ErrNotFound for 404, *StatusError for other
// statuses, or the network error. The response body, when returned, aborts itself if it
// stalls, and must be closed.
func (c *Client) Do(ctx context.Context, r Request) (*http.Response, error) {
	ctx = docker.WithScope(ctx, "repository:"+r.Repo+":pull")
	attempts := r.Attempts
	if attempts <= 0 {
		attempts = c.opts.MaxAttempts
	}
	var lastErr error
	for _, ep := range c.endpoints {
		resp, err := c.tryEndpoint(ctx, ep, r, attempts)
		if err == nil {
			return resp, nil
		}
		if ctx.Err() != nil {
			return nil, err
		}
		lastErr = err
		c.log.Debug("upstream endpoint failed", "registry", c.name, "endpoint", ep.Host, "err", err)
	}
	return nil, lastErr
}

func (c *Client) tryEndpoint(ctx context.Context, ep *url.URL, r Request, attempts int) (*http.Response, error) {
	u := *ep
	u.Path = strings.TrimSuffix(ep.Path, "/") + "/v2/" + r.Repo + "/" + r.Path
	if r.Query != nil {
		u.RawQuery = r.Query.Encode()
	}
	authRetried := false
	var lastErr error
	for attempt := 0; attempt < attempts; attempt++ {
		resp, cancel, err := c.send(ctx, r, &u)
		if err != nil {
			lastErr = fmt.Errorf("%s %s: %w", r.Method, u.Redacted(), err)
			if ctx.Err() != nil {
				return nil, lastErr
			}
			if attempt+1 < attempts {
				if err := sleep(ctx, c.backoff(attempt)); err != nil {
					return nil, lastErr
				}
			}
			continue
		}
		switch {
		case resp.StatusCode >= 200 && resp.StatusCode < 300:
			resp.Body = newStallReader(resp.Body, cancel, c.opts.StallTimeout)
			return resp, nil
		case resp.StatusCode == http.StatusUnauthorized && !authRetried:
			authRetried = true
			err := c.authorizer().AddResponses(ctx, []*http.Response{resp})
			discard(resp, cancel)
			if err != nil {
				return nil, fmt.Errorf("authenticating to %s: %w", ep.Host, err)
			}
			attempt-- // an auth challenge is not a failed attempt
			continue
		case resp.StatusCode == http.StatusNotFound:
			discard(resp, cancel)
			return nil, ErrNotFound
		case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
			se := &StatusError{Endpoint: ep.Host, Status: resp.StatusCode, RetryAfter: retryAfter(resp.Header)}
			discard(resp, cancel)
			lastErr = se
			if attempt+1 >= attempts {
				break
			}
			wait := c.backoff(attempt)
			if se.RetryAfter > 0 {
				if se.RetryAfter > c.opts.MaxRetryAfter {
					return nil, se // waiting that long would stall the engine; let the caller decide
				}
				wait = se.RetryAfter
			}
			if err := sleep(ctx, wait); err != nil {
				return nil, se
			}
		default:
			se := &StatusError{Endpoint: ep.Host, Status: resp.StatusCode}
			discard(resp, cancel)
			return nil, se
		}
	}
	return nil, lastErr
}

// send issues one request. The returned cancel ends the request's context; the stall
// reader calls it when the body goes quiet.
func (c *Client) send(ctx context.Context, r Request, u *url.URL) (*http.Response, context.CancelFunc, error) {
	rctx, cancel := context.WithCancel(ctx)
	req, err := http.NewRequestWithContext(rctx, r.Method, u.String(), nil)
	if err != nil {
		cancel()
		return nil, nil, err
	}
	for k, v := range r.Header {
		req.Header[k] = v
	}
	req.Header.Set("User-Agent", c.opts.UserAgent)
	auth := c.authorizer()
	if err := auth.Authorize(rctx, req); err != nil {
		cancel()
		c.resetAuth(auth)
		return nil, nil, fmt.Errorf("authorizing: %w", err)
	}
	start := time.Now()
	resp, err := c.http.Do(req)
	if c.opts.Observe != nil {
		c.opts.Observe(resp, time.Since(start), err)
	}
	if err != nil {
		cancel()
		return nil, nil, err
	}
	return resp, cancel, nil
}

func (c *Client) authorizer() docker.Authorizer {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.auth
}

// resetAuth drops the authorizer's state after a failed token fetch. containerd's
// authorizer keeps a failed fetch as the answer for that scope until it is replaced;
// that suits a one-shot pull, but in a daemon one auth-server outage would last forever.
func (c *Client) resetAuth(failed docker.Authorizer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.auth == failed {
		c.auth = c.newAuth()
	}
}

func (c *Client) backoff(attempt int) time.Duration {
	d := c.opts.BaseBackoff << attempt
	if d > 5*time.Second {
		d = 5 * time.Second
	}
	// Jitter keeps a fleet of nodes from retrying in lockstep.
	return d/2 + rand.N(d/2+1)
}

func discard(resp *http.Response, cancel context.CancelFunc) {
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	cancel()
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// retryAfter parses Retry-After as seconds or an HTTP date.
func retryAfter(h http.Header) time.Duration {
	v := h.Get("Retry-After")
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := time.Until(t); d > 0 {
			return d
		}
	}
	return 0
}

// stallReader cancels the request when the body delivers nothing for too long, which
// turns a hung upstream into an error instead of a pull that never ends.
type stallReader struct {
	rc     io.ReadCloser
	timer  *time.Timer
	cancel context.CancelFunc
	limit  time.Duration
}

func newStallReader(rc io.ReadCloser, cancel context.CancelFunc, limit time.Duration) io.ReadCloser {
	return &stallReader{rc: rc, cancel: cancel, limit: limit, timer: time.AfterFunc(limit, cancel)}
}

func (s *stallReader) Read(p []byte) (int, error) {
	n, err := s.rc.Read(p)
	if n > 0 {
		s.timer.Reset(s.limit)
	}
	return n, err
}

func (s *stallReader) Close() error {
	s.timer.Stop()
	err := s.rc.Close()
	s.cancel()
	return err
}
