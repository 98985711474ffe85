// Package upstream talks to the real registries behind the mirror: endpoints tried in
// order, token and basic auth (containerd's authorizer) with credentials per endpoint,
// retries with backoff that honour Retry-After, timeouts on connect and on stalled
// bodies, and the trust rules of netguard for every redirect, realm and dial.
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
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/auth"

	"github.com/node-mirror/node-mirror/internal/regname"
	"github.com/node-mirror/node-mirror/pkg/upstream/netguard"
)

const (
	// maxRedirects bounds a redirect chain; registries use one hop to a CDN, two at most.
	maxRedirects = 5
	// maxScopes is how many repositories the token cache holds tokens for before it
	// starts afresh: containerd's authorizer keeps one token per scope for as long as it
	// lives, and local clients choose the repository names.
	maxScopes = 256
	// maxTokenResponse caps a token server's answer (real ones are a few KiB), so that
	// maxScopes tokens stay a few MiB whatever a token server sends.
	maxTokenResponse = 64 << 10
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
	// Transport replaces the default transport, and with it the dial guard (tests inject
	// faults here); redirects and realms are judged all the same.
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
	// EndpointCredentials gives endpoints other than the registry's own (a corporate
	// mirror) credentials of their own, by the endpoint's host[:port]. No endpoint ever
	// receives another's.
	EndpointCredentials map[string]Credentials
	// TrustedHosts are host[:port]s (port 443 when absent) that redirects and token realms
	// of this registry may reach wherever they resolve, private addresses included: an
	// on-premises registry whose token server (GitLab's /jwt/auth) or storage is another
	// private host. The other rules stand: https only, and credentials only where Realm
	// and Redirect allow them.
	TrustedHosts []string
	// AllowAddr, when set, lets the client reach addresses it refuses as non-public
	// (loopback, private, link-local) beyond the configured endpoints. It is a test seam
	// (an https "CDN" in a test can only be on loopback) and nil in production.
	AllowAddr func(netip.AddrPort) bool
}

// Credentials for token or basic auth at one endpoint.
type Credentials struct {
	Username, Password string
}

// Client reaches one registry through its endpoints. Safe for concurrent use.
type Client struct {
	name      string
	endpoints []*url.URL
	creds     map[string]Credentials // by netguard.HostPort of the endpoint
	http      *http.Client
	authHTTP  *http.Client // token fetches: same transport and redirect rules, bounded answers
	newAuth   func() docker.Authorizer
	opts      Options
	log       *slog.Logger

	// challengeMu serialises AddResponses so that the credentials callback, which
	// containerd calls from inside it, answers for the challenge just judged.
	challengeMu sync.Mutex
	pending     pendingCreds

	// allow admits non-public literal addresses: the trusted hosts that are addresses,
	// and the AllowAddr test seam.
	allow func(netip.AddrPort) bool

	mu     sync.Mutex
	auth   docker.Authorizer
	scopes map[string]struct{} // scopes the current authorizer has seen
}

// pendingCreds is what the credentials callback may hand out during one AddResponses.
type pendingCreds struct {
	host string
	Credentials
}

// endpointKey carries the configured endpoint a request chain began at, for the
// redirect policy (token fetches, made by containerd, inherit it too).
type endpointKey struct{}

// NewTransport is the transport used for upstream traffic: bounded connect, TLS and
// header waits, since a hung registry must not hang pulls indefinitely. A Client adds
// its address guard to it.
func NewTransport() *http.Transport {
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           newDialer().DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          100,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

func newDialer() *net.Dialer {
	return &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
}

// guard makes t dial the configured endpoints (and the environment's proxy) wherever
// they resolve, and anything else, such as a redirect target or a token realm, only at
// public addresses. Behind a proxy, the proxy resolves names; literal addresses are
// still judged by the redirect and realm rules.
func guard(t *http.Transport, endpoints []*url.URL, trustedHosts []string, allow func(netip.AddrPort) bool) {
	trusted := slices.Clone(trustedHosts)
	for _, ep := range endpoints {
		trusted = append(trusted, netguard.HostPort(ep))
	}
	d := netguard.NewDialer(newDialer(), trusted, allow)
	t.DialContext = d.DialContext
	proxy := t.Proxy
	if proxy == nil {
		return
	}
	t.Proxy = func(r *http.Request) (*url.URL, error) {
		u, err := proxy(r)
		if u != nil {
			d.Trust(netguard.HostPort(u))
		}
		return u, err
	}
}

// New returns a client for the registry called name, reached at endpoints in order.
// username and password are the registry's own credentials: they go to its own endpoint
// (see OwnEndpoint) and to no other; opts.EndpointCredentials gives other endpoints theirs.
func New(name string, endpoints []string, username, password string, opts Options) (*Client, error) {
	if len(endpoints) == 0 {
		return nil, fmt.Errorf("registry %s: no endpoints", name)
	}
	c := &Client{name: name, opts: opts, creds: map[string]Credentials{}, scopes: map[string]struct{}{}}
	for _, e := range endpoints {
		u, err := url.Parse(strings.TrimSuffix(e, "/"))
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
			return nil, fmt.Errorf("registry %s: bad endpoint %q", name, e)
		}
		c.endpoints = append(c.endpoints, u)
	}
	if username != "" || password != "" {
		own := OwnEndpoint(name, endpoints)
		if own < 0 {
			return nil, fmt.Errorf("registry %s: its credentials belong to its own endpoint %s, which is not among its endpoints; give each endpoint its own", name, APIHost(name))
		}
		c.creds[netguard.HostPort(c.endpoints[own])] = Credentials{Username: username, Password: password}
	}
	for host, cr := range opts.EndpointCredentials {
		found := false
		for _, ep := range c.endpoints {
			if sameHost(ep, host) {
				c.creds[netguard.HostPort(ep)] = cr
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("registry %s: credentials for %q, which is not the host of any of its endpoints", name, host)
		}
	}
	trustedHosts, trustedAddrs, err := parseTrustedHosts(opts.TrustedHosts)
	if err != nil {
		return nil, fmt.Errorf("registry %s: %w", name, err)
	}
	c.allow = func(ap netip.AddrPort) bool {
		return trustedAddrs[netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())] || opts.AllowAddr != nil && opts.AllowAddr(ap)
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
		guard(t, c.endpoints, trustedHosts, c.allow)
		rt = t
	}
	c.http = &http.Client{Transport: rt, CheckRedirect: c.checkRedirect}
	c.authHTTP = &http.Client{Transport: capBody{rt, maxTokenResponse}, CheckRedirect: c.checkRedirect}
	c.newAuth = func() docker.Authorizer {
		return docker.NewDockerAuthorizer(
			docker.WithAuthClient(c.authHTTP),
			docker.WithAuthCreds(c.credentials),
		)
	}
	c.auth = c.newAuth()
	return c, nil
}

// parseTrustedHosts returns the host:ports of hosts (port 443 when absent), and those
// that are IP addresses as such. Each is host[:port] by the rule of registry names.
func parseTrustedHosts(hosts []string) ([]string, map[netip.AddrPort]bool, error) {
	var hps []string
	addrs := map[netip.AddrPort]bool{}
	for _, h := range hosts {
		if err := regname.Check(h); err != nil {
			return nil, nil, fmt.Errorf("trusted host: %w", err)
		}
		hp := netguard.HostPort(&url.URL{Scheme: "https", Host: h})
		hps = append(hps, hp)
		if ap, err := netip.ParseAddrPort(hp); err == nil {
			addrs[netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())] = true
		}
	}
	return hps, addrs, nil
}

// APIHost is where a registry's API lives: registry-1.docker.io for docker.io, the
// registry's own name otherwise (config.DefaultEndpoint agrees).
func APIHost(name string) string {
	if name == "docker.io" {
		return "registry-1.docker.io"
	}
	return name
}

// OwnEndpoint is the index of the registry's own endpoint among endpoints, the one its
// registry-level credentials belong to: the endpoint at its API host, or the only
// endpoint when there is one. -1 when there is none.
func OwnEndpoint(name string, endpoints []string) int {
	for i, e := range endpoints {
		if u, err := url.Parse(e); err == nil && sameHost(u, APIHost(name)) {
			return i
		}
	}
	if len(endpoints) == 1 {
		return 0
	}
	return -1
}

// sameHost reports whether host[:port] names u's server, the port defaulting to u's
// scheme's.
func sameHost(u *url.URL, host string) bool {
	h, err := url.Parse(u.Scheme + "://" + host)
	return err == nil && h.Host == host && netguard.HostPort(h) == netguard.HostPort(u)
}

// credentials is containerd's credentials callback. containerd calls it only from
// AddResponses, which runs under challengeMu with pending set for the endpoint whose
// challenge was judged; at any other time, and for any other host, it gives nothing.
func (c *Client) credentials(host string) (string, string, error) {
	if c.pending.host == "" || c.pending.host != host {
		return "", "", nil
	}
	return c.pending.Username, c.pending.Password, nil
}

// checkRedirect applies netguard's redirect rule to every hop of every request,
// including containerd's token fetches.
func (c *Client) checkRedirect(req *http.Request, via []*http.Request) error {
	ep, _ := req.Context().Value(endpointKey{}).(*url.URL)
	if len(via) > maxRedirects {
		return &netguard.DeniedError{Target: req.URL.Redacted(), Reason: fmt.Sprintf("more than %d redirects", maxRedirects)}
	}
	v := netguard.Redirect(ep, via[len(via)-1].URL, req.URL, c.allow)
	if !v.Allow {
		return &netguard.DeniedError{Target: req.URL.Redacted(), Reason: v.Reason}
	}
	// A 307 or 308 resends the body: a token POST carries the password in it.
	if req.Body != nil && req.Body != http.NoBody && netguard.HostPort(req.URL) != netguard.HostPort(via[0].URL) {
		return &netguard.DeniedError{Target: req.URL.Redacted(), Reason: "would resend a request body to another host"}
	}
	if !v.Credentials {
		// Go keeps these on a redirect to the same host name on another port, and to
		// subdomains; only the endpoint itself may have them.
		for _, h := range []string{"Authorization", "Cookie", "Cookie2", "Proxy-Authorization"} {
			req.Header.Del(h)
		}
	}
	return nil
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
	scope := "repository:" + r.Repo + ":pull"
	ctx = docker.WithScope(ctx, scope)
	attempts := r.Attempts
	if attempts <= 0 {
		attempts = c.opts.MaxAttempts
	}
	var lastErr error
	for _, ep := range c.endpoints {
		resp, err := c.tryEndpoint(ctx, ep, scope, r, attempts)
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

func (c *Client) tryEndpoint(ctx context.Context, ep *url.URL, scope string, r Request, attempts int) (*http.Response, error) {
	ctx = context.WithValue(ctx, endpointKey{}, ep)
	// One authorizer for the whole exchange: the one that took a challenge must be the
	// one that answers it, even if the current one is replaced meanwhile.
	auth := c.authorizer(scope)
	u := *ep
	u.Path = strings.TrimSuffix(ep.Path, "/") + "/v2/" + r.Repo + "/" + r.Path
	if r.Query != nil {
		u.RawQuery = r.Query.Encode()
	}
	authRetried := false
	var lastErr error
	for attempt := 0; attempt < attempts; attempt++ {
		resp, cancel, err := c.send(ctx, auth, r, &u)
		if err != nil {
			lastErr = fmt.Errorf("%s %s: %w", r.Method, u.Redacted(), err)
			if errors.Is(err, errAuthorize) {
				// The failed fetch is cached by the authorizer; start from a fresh one.
				c.resetAuth(auth)
				auth = c.authorizer(scope)
			}
			if ctx.Err() != nil || errors.Is(err, netguard.ErrDenied) {
				// A refusal is the policy's answer, not a fault that retrying mends.
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
		case resp.StatusCode == http.StatusUnauthorized && !authRetried && resp.Request.URL.Host == ep.Host:
			// Only the endpoint's own challenge is answered: a redirect target's would
			// set up auth for a host the client never sends credentials to.
			authRetried = true
			err := c.addChallenge(ctx, auth, ep, resp)
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

// addChallenge hands the endpoint's 401 to the authorizer, after judging the challenge
// containerd will act on (the first bearer or basic one, bearer first): a realm that the
// redirect rule would not follow is refused, and the endpoint's credentials go along
// only where netguard.Realm allows; elsewhere the token is fetched anonymously.
func (c *Client) addChallenge(ctx context.Context, a docker.Authorizer, ep *url.URL, resp *http.Response) error {
	var creds Credentials
	for _, ch := range auth.ParseAuthHeader(resp.Header) {
		if ch.Scheme == auth.BasicAuth {
			creds = c.creds[netguard.HostPort(ep)] // to the endpoint itself
			break
		}
		if ch.Scheme == auth.BearerAuth {
			realm, err := url.Parse(ch.Parameters["realm"])
			if err != nil {
				return fmt.Errorf("bad token realm: %w", err)
			}
			v := netguard.Realm(ep, realm, c.allow)
			if !v.Allow {
				return &netguard.DeniedError{Target: "token realm " + realm.Redacted(), Reason: v.Reason}
			}
			if v.Credentials {
				creds = c.creds[netguard.HostPort(ep)]
			}
			break
		}
	}
	c.challengeMu.Lock()
	defer c.challengeMu.Unlock()
	c.pending = pendingCreds{host: resp.Request.URL.Host, Credentials: creds}
	defer func() { c.pending = pendingCreds{} }()
	return a.AddResponses(ctx, []*http.Response{resp})
}

// errAuthorize marks a failure to authorize a request (a failed token fetch).
var errAuthorize = errors.New("authorizing")

// send issues one request. The returned cancel ends the request's context; the stall
// reader calls it when the body goes quiet.
func (c *Client) send(ctx context.Context, auth docker.Authorizer, r Request, u *url.URL) (*http.Response, context.CancelFunc, error) {
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
	if err := auth.Authorize(rctx, req); err != nil {
		cancel()
		return nil, nil, fmt.Errorf("%w: %w", errAuthorize, err)
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

// authorizer returns the current authorizer for a request in scope. Once the current one
// has seen maxScopes distinct scopes it is replaced, which drops its cached tokens: the
// repositories a client names cannot grow the cache without bound.
func (c *Client) authorizer(scope string) docker.Authorizer {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.scopes[scope]; !ok {
		if len(c.scopes) >= maxScopes {
			c.auth = c.newAuth()
			clear(c.scopes)
		}
		c.scopes[scope] = struct{}{}
	}
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
		clear(c.scopes)
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

// capBody fails a response body that runs past limit, so a token server cannot make the
// client hold more than limit per token.
type capBody struct {
	rt    http.RoundTripper
	limit int64
}

func (c capBody) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := c.rt.RoundTrip(req)
	if err == nil {
		resp.Body = &cappedReader{rc: resp.Body, left: c.limit}
	}
	return resp, err
}

type cappedReader struct {
	rc   io.ReadCloser
	left int64
}

func (r *cappedReader) Read(p []byte) (int, error) {
	if r.left <= 0 {
		return 0, errors.New("token response too large")
	}
	if int64(len(p)) > r.left {
		p = p[:r.left]
	}
	n, err := r.rc.Read(p)
	r.left -= int64(n)
	return n, err
}

func (r *cappedReader) Close() error { return r.rc.Close() }
