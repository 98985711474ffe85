package main

import (
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"
)

// realmPlaceholder is the token realm written into the upstream registry's config. The
// front replaces it in every challenge with the address the client used, so that a
// client that is refused it (it does not resolve) shows that a challenge bypassed the
// front.
const realmPlaceholder = "http://bench-realm.invalid/token"

// front is the upstream registry as its clients reach it: one host:port that serves the
// registry's API and the token endpoint beside it. node-mirror refuses a plain-http
// realm on another host:port than its configured endpoint (the trust-boundary rule for
// loopback and private realms), so the realm must live where the registry does; Docker
// Hub's realm is on another host, but over https, which loopback cannot imitate. Each
// throttle forwards to the front, so a client's challenge names the throttle it came
// through, and tokens cross the same round trip and bandwidth cap as blobs.
type front struct {
	ln    net.Listener
	srv   *http.Server
	proxy *httputil.ReverseProxy
	tr    *http.Transport
}

// newFront serves the registry at registryAddr (host:port) and the token service ts.
// Proxy errors (a client that hangs up mid-blob) go to errLog.
func newFront(registryAddr string, ts *tokenServer, errLog io.Writer) (*front, error) {
	target := &url.URL{Scheme: "http", Host: registryAddr}
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true,
	}
	f := &front{tr: tr}
	f.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			// The registry builds upload Locations from Host: keep the client's, so they
			// lead back through the same throttle.
			pr.Out.Host = pr.In.Host
		},
		ModifyResponse: func(resp *http.Response) error {
			rewriteRealm(resp.Header, resp.Request.Host)
			return nil
		},
		Transport:  tr,
		BufferPool: bufferPool{},
		ErrorLog:   log.New(errLog, "front: ", log.LstdFlags),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/token", ts.serveToken)
	mux.Handle("/", f.proxy)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f.ln = ln
	f.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ErrorLog: f.proxy.ErrorLog}
	go f.srv.Serve(ln)
	return f, nil
}

func (f *front) Addr() string { return f.ln.Addr().String() }

func (f *front) Close() {
	f.srv.Close()
	f.tr.CloseIdleConnections()
}

// rewriteRealm points the Bearer challenges in h at the token endpoint on host.
func rewriteRealm(h http.Header, host string) {
	vs := h.Values("Www-Authenticate")
	if len(vs) == 0 {
		return
	}
	h.Del("Www-Authenticate")
	for _, v := range vs {
		h.Add("Www-Authenticate", strings.ReplaceAll(v, realmPlaceholder, "http://"+host+"/token"))
	}
}

// bufferPool gives the proxy 256 KiB buffers: blobs cross it at up to several hundred
// MB/s on the machine that is being measured, and larger reads cost fewer syscalls.
type bufferPool struct{}

var proxyBufs = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

func (bufferPool) Get() []byte  { return *proxyBufs.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { proxyBufs.Put(&b) }
