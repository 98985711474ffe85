package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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
