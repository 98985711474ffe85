// Package fault wraps a registry handler and misbehaves on request, the ways real
// registries and networks do: wrong bytes, short bodies, errors, stalls, resets.
// Tests use it as the upstream of a mirror and assert the mirror's contract holds.
package fault

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Kind names one misbehaviour.
type Kind string

const (
	FlipByte           Kind = "flip-byte"            // one byte in the middle of the body inverted
	Truncate           Kind = "truncate"             // half the body, then the connection closes
	OtherManifest      Kind = "other-manifest"       // a different, valid manifest than the one asked for
	Status             Kind = "status"               // Rule.Status with Rule.RetryAfter, no body
	StallAfterHeaders  Kind = "stall-after-headers"  // headers and some bytes, then silence
	StallBeforeHeaders Kind = "stall-before-headers" // nothing at all
	Trickle            Kind = "trickle"              // the right bytes, very slowly
	Reset              Kind = "reset"                // TCP reset after the headers were read
	WrongLength        Kind = "wrong-length"         // Content-Length larger than the body
	TokenError         Kind = "token-error"          // the token endpoint fails (with RequireToken)
)

// Rule applies Kind to requests it matches.
type Rule struct {
	Kind Kind
	// Method and PathContains select requests; empty matches all.
	Method       string
	PathContains string
	Status       int    // for Status and TokenError (default 500)
	RetryAfter   string // header value for Status
	// Times limits how often the rule fires; 0 means every time.
	Times int
	// Manifest is served for OtherManifest.
	Manifest []byte
}

// Injector is an http.Handler in front of a real registry.
type Injector struct {
	next http.Handler

	mu           sync.Mutex
	rules        []*rule
	requireToken bool
	fired        map[Kind]int

	stop     chan struct{} // closed by Close: ends every stall so tests finish
	stopOnce sync.Once
}

type rule struct {
	Rule
	fired int
}

// New wraps next.
func New(next http.Handler) *Injector {
	return &Injector{next: next, fired: map[Kind]int{}, stop: make(chan struct{})}
}

// Set replaces the rules.
func (in *Injector) Set(rules ...Rule) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.rules = nil
	for _, r := range rules {
		in.rules = append(in.rules, &rule{Rule: r})
	}
}

// Clear removes every rule: the upstream is healthy again.
func (in *Injector) Clear() { in.Set() }

// RequireToken makes the upstream demand a bearer token from its own /token endpoint,
// the way Docker Hub does, so token failures can be injected.
func (in *Injector) RequireToken(on bool) {
	in.mu.Lock()
	in.requireToken = on
	in.mu.Unlock()
}

// Fired reports how often a kind of fault was applied.
func (in *Injector) Fired(k Kind) int {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.fired[k]
}

// Close ends all stalls.
func (in *Injector) Close() { in.stopOnce.Do(func() { close(in.stop) }) }

func (in *Injector) match(r *http.Request) *Rule {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, ru := range in.rules {
		if ru.Method != "" && ru.Method != r.Method {
			continue
		}
		if ru.PathContains != "" && !strings.Contains(r.URL.Path, ru.PathContains) {
			continue
		}
		if ru.Times > 0 && ru.fired >= ru.Times {
			continue
		}
		ru.fired++
		in.fired[ru.Kind]++
		rr := ru.Rule
		return &rr
	}
	return nil
}

func (in *Injector) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	in.mu.Lock()
	requireToken := in.requireToken
	in.mu.Unlock()
	ru := in.match(r)

	if requireToken {
		if r.URL.Path == "/token" {
			if ru != nil && ru.Kind == TokenError {
				w.WriteHeader(orDefault(ru.Status, http.StatusInternalServerError))
				return
			}
			json.NewEncoder(w).Encode(map[string]any{"token": "fault-token", "expires_in": 300})
			return
		}
		if r.Header.Get("Authorization") != "Bearer fault-token" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="http://`+r.Host+`/token",service="fault"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
	}
	if ru == nil || ru.Kind == TokenError {
		in.next.ServeHTTP(w, r)
		return
	}

	switch ru.Kind {
	case Status:
		if ru.RetryAfter != "" {
			w.Header().Set("Retry-After", ru.RetryAfter)
		}
		w.WriteHeader(orDefault(ru.Status, http.StatusInternalServerError))
		return
	case StallBeforeHeaders:
		in.stall(r)
		return
	case Reset:
		reset(w)
		return
	}

	// The remaining faults distort a real answer.
	rec := httptest.NewRecorder()
	in.next.ServeHTTP(rec, r)
	body := rec.Body.Bytes()
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	// Whole answers and ranges alike: a ranged fetch asks for ranges.
	code := rec.Code
	if (code != http.StatusOK && code != http.StatusPartialContent) || len(body) == 0 {
		w.WriteHeader(code)
		w.Write(body)
		return
	}
	switch ru.Kind {
	case FlipByte:
		body = bytes.Clone(body)
		body[len(body)/2] ^= 0xff
		writeAll(w, code, body, len(body))
	case Truncate:
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(code)
		w.Write(body[:len(body)/2])
		panic(http.ErrAbortHandler) // closes the connection mid-body
	case OtherManifest:
		writeAll(w, code, ru.Manifest, len(ru.Manifest))
	case StallAfterHeaders:
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(code)
		w.Write(body[:len(body)/4])
		http.NewResponseController(w).Flush()
		in.stall(r)
	case Trickle:
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(code)
		step := max(len(body)/50, 1)
		for i := 0; i < len(body); i += step {
			w.Write(body[i:min(i+step, len(body))])
			http.NewResponseController(w).Flush()
			select {
			case <-time.After(10 * time.Millisecond):
			case <-r.Context().Done():
				return
			case <-in.stop:
				return
			}
		}
	case WrongLength:
		w.Header().Set("Content-Length", strconv.Itoa(len(body)+100))
		w.WriteHeader(code)
		w.Write(body)
		panic(http.ErrAbortHandler)
	default:
		writeAll(w, code, body, len(body))
	}
}

func (in *Injector) stall(r *http.Request) {
	select {
	case <-r.Context().Done():
	case <-in.stop:
	}
}

func writeAll(w http.ResponseWriter, code int, b []byte, n int) {
	w.Header().Set("Content-Length", strconv.Itoa(n))
	w.WriteHeader(code)
	w.Write(b)
}

// reset aborts the connection with a TCP RST (SO_LINGER 0), as a crashing proxy does.
func reset(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	conn.Close()
}

func orDefault(v, d int) int {
	if v == 0 {
		return d
	}
	return v
}
