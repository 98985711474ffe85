package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// manifestAccept is what container engines send when they resolve a reference.
const manifestAccept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, " +
	"application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json"

// newClient is a keep-alive HTTP/1.1 client with room for conns connections to one host.
func newClient(conns int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        conns,
		MaxIdleConnsPerHost: conns,
		MaxConnsPerHost:     conns,
		DisableCompression:  true,
		ForceAttemptHTTP2:   false,
		IdleConnTimeout:     time.Minute,
	}}
}

func closeClient(c *http.Client) { c.Transport.(*http.Transport).CloseIdleConnections() }

// throughput has clients GET url over and over for d and reports bytes received per
// second. Partial bodies at the deadline count. Reads go through a 1 MiB buffer so the
// load generator spends as little of the shared CPU as it can.
func throughput(ctx context.Context, url string, clients int, d time.Duration) (bytesPerSec float64, total int64, err error) {
	cl := newClient(clients)
	defer closeClient(cl)
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var n atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1<<20)
			for ctx.Err() == nil {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
				resp, err := cl.Do(req)
				if err != nil {
					if ctx.Err() == nil {
						once.Do(func() { firstErr = err })
					}
					return
				}
				if resp.StatusCode != http.StatusOK {
					resp.Body.Close()
					once.Do(func() { firstErr = fmt.Errorf("GET %s: %s", url, resp.Status) })
					return
				}
				for {
					k, err := resp.Body.Read(buf)
					n.Add(int64(k))
					if err != nil {
						break
					}
				}
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	if firstErr != nil {
		return 0, n.Load(), firstErr
	}
	return float64(n.Load()) / el.Seconds(), n.Load(), nil
}

// requestRate has conns connections GET url as fast as they can for d and reports the
// completed 200 answers per second.
func requestRate(ctx context.Context, url, accept string, conns int, d time.Duration) (float64, error) {
	cl := newClient(conns)
	defer closeClient(cl)
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var ok, bad atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
				if accept != "" {
					req.Header.Set("Accept", accept)
				}
				resp, err := cl.Do(req)
				if err != nil {
					if ctx.Err() == nil {
						bad.Add(1)
						once.Do(func() { firstErr = err })
					}
					continue
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				switch {
				case err != nil && ctx.Err() != nil:
				case err != nil:
					bad.Add(1)
					once.Do(func() { firstErr = err })
				case resp.StatusCode == http.StatusOK:
					ok.Add(1)
				default:
					bad.Add(1)
					once.Do(func() { firstErr = fmt.Errorf("GET %s: %s", url, resp.Status) })
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	if b := bad.Load(); b > 0 {
		return 0, fmt.Errorf("%d of %d requests failed, first: %w", b, b+ok.Load(), firstErr)
	}
	return float64(ok.Load()) / el.Seconds(), nil
}

// herd starts clients GETs of url at the same instant and waits for every body. It
// returns the time until the last client had all size bytes.
func herd(ctx context.Context, url string, clients int, size int64) (time.Duration, error) {
	cl := newClient(clients)
	defer closeClient(cl)
	// Connect first, so the herd measures the blob and not 16 TCP handshakes.
	var wg sync.WaitGroup
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, baseURL(url)+"/v2/", nil)
			if resp, err := cl.Do(req); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()

	start := make(chan struct{})
	errs := make(chan error, clients)
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			resp, err := cl.Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				errs <- fmt.Errorf("GET %s: %s", url, resp.Status)
				return
			}
			buf := make([]byte, 1<<20)
			var got int64
			for {
				k, err := resp.Body.Read(buf)
				got += int64(k)
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					errs <- fmt.Errorf("after %d bytes: %w", got, err)
					return
				}
			}
			if got != size {
				errs <- fmt.Errorf("got %d bytes, want %d", got, size)
			}
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	took := time.Since(t0)
	close(errs)
	if err := <-errs; err != nil {
		return took, err
	}
	return took, nil
}

// baseURL is scheme://host of a URL.
func baseURL(u string) string {
	n := 0
	for i, c := range u {
		if c == '/' {
			n++
			if n == 3 {
				return u[:i]
			}
		}
	}
	return u
}

// getDigest fetches a manifest and returns its Docker-Content-Digest.
func getDigest(ctx context.Context, cl *http.Client, url string) (string, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	req.Header.Set("Accept", manifestAccept)
	resp, err := cl.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return resp.Header.Get("Docker-Content-Digest"), nil
}

// fetchAll GETs url once and discards the body, failing on any status but 200.
func fetchAll(ctx context.Context, cl *http.Client, url, accept string) (int64, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := cl.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return n, err
}

// directBlob GETs a blob from a registry as a client without a cache would: one stream,
// after the anonymous token dance its 401 asks for. It returns the time from the first
// request to the last byte.
func directBlob(ctx context.Context, base, repo, dgst string, size int64) (time.Duration, error) {
	cl := newClient(1)
	defer closeClient(cl)
	url := fmt.Sprintf("%s/v2/%s/blobs/%s", base, repo, dgst)
	start := time.Now()
	resp, err := getWithToken(ctx, cl, url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	n, err := io.CopyBuffer(io.Discard, resp.Body, make([]byte, 1<<20))
	took := time.Since(start)
	if err != nil {
		return took, fmt.Errorf("after %d bytes: %w", n, err)
	}
	if n != size {
		return took, fmt.Errorf("got %d bytes, want %d", n, size)
	}
	return took, nil
}

// getWithToken GETs url, and on a Bearer challenge fetches an anonymous token from its
// realm and asks again with it.
func getWithToken(ctx context.Context, cl *http.Client, url string) (*http.Response, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := cl.Do(req)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	ch := parseChallenge(resp.Header.Get("Www-Authenticate"))
	if ch["realm"] == "" {
		return nil, fmt.Errorf("GET %s: 401 without a Bearer realm (%q)", url, resp.Header.Get("Www-Authenticate"))
	}
	q := neturl.Values{}
	for _, k := range []string{"service", "scope"} {
		if v := ch[k]; v != "" {
			q.Set(k, v)
		}
	}
	treq, _ := http.NewRequestWithContext(ctx, http.MethodGet, ch["realm"]+"?"+q.Encode(), nil)
	tresp, err := cl.Do(treq)
	if err != nil {
		return nil, fmt.Errorf("token: %w", err)
	}
	defer tresp.Body.Close()
	var tok struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
	}
	if tresp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("token: GET %s: %s", treq.URL, tresp.Status)
	}
	if err := json.NewDecoder(tresp.Body).Decode(&tok); err != nil {
		return nil, fmt.Errorf("token: %w", err)
	}
	if tok.Token == "" {
		tok.Token = tok.AccessToken
	}
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	req.Header.Set("Authorization", "Bearer "+tok.Token)
	return cl.Do(req)
}

// parseChallenge reads the parameters of a `Bearer k="v",...` challenge (lower-case keys).
func parseChallenge(h string) map[string]string {
	out := map[string]string{}
	scheme, rest, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return out
	}
	for rest = strings.TrimSpace(rest); rest != ""; rest = strings.TrimLeft(strings.TrimSpace(rest), ",") {
		k, v, ok := strings.Cut(rest, "=")
		if !ok {
			break
		}
		k = strings.ToLower(strings.TrimSpace(k))
		v = strings.TrimSpace(v)
		if strings.HasPrefix(v, `"`) {
			end := strings.IndexByte(v[1:], '"')
			if end < 0 {
				break
			}
			out[k], rest = v[1:1+end], v[2+end:]
		} else {
			val, r, _ := strings.Cut(v, ",")
			out[k], rest = strings.TrimSpace(val), r
		}
		rest = strings.TrimSpace(rest)
	}
	return out
}
