package server

import (
	"bufio"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// TokenAuth accepts "Authorization: Bearer <token>" for one of the tokens in a file.
type TokenAuth struct {
	tokens [][sha256.Size]byte
}

// LoadTokenFile reads one token per line; blank lines and # comments are skipped.
func LoadTokenFile(path string) (*TokenAuth, error) {
	lines, err := readLines(path)
	if err != nil {
		return nil, err
	}
	a := &TokenAuth{}
	for _, l := range lines {
		a.tokens = append(a.tokens, sha256.Sum256([]byte(l.text)))
	}
	if len(a.tokens) == 0 {
		return nil, fmt.Errorf("%s: no tokens", path)
	}
	return a, nil
}

// Authenticate compares hashes in constant time, against every token, so neither the
// content nor the position of a match leaks through timing.
func (a *TokenAuth) Authenticate(r *http.Request) bool {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return false
	}
	h := sha256.Sum256([]byte(got))
	match := 0
	for _, t := range a.tokens {
		match |= subtle.ConstantTimeCompare(h[:], t[:])
	}
	return match == 1
}

// Challenge implements Authenticator.
func (a *TokenAuth) Challenge() string { return `Bearer realm="node-mirror"` }

// HtpasswdAuth accepts HTTP basic credentials checked against bcrypt htpasswd entries.
type HtpasswdAuth struct {
	users map[string][]byte
	// bcrypt costs tens of milliseconds by design; an engine sends the same credentials
	// with every layer request, so successful checks are remembered for a short while.
	mu       sync.Mutex
	verified map[[sha256.Size]byte]time.Time
}

// dummyHash keeps unknown users as slow as known ones.
var dummyHash, _ = bcrypt.GenerateFromPassword([]byte("node-mirror"), bcrypt.DefaultCost)

// LoadHtpasswd reads user:bcrypt-hash lines (htpasswd -B).
func LoadHtpasswd(path string) (*HtpasswdAuth, error) {
	lines, err := readLines(path)
	if err != nil {
		return nil, err
	}
	a := &HtpasswdAuth{users: map[string][]byte{}, verified: map[[sha256.Size]byte]time.Time{}}
	for _, l := range lines {
		user, hash, ok := strings.Cut(l.text, ":")
		if !ok || user == "" {
			return nil, fmt.Errorf("%s:%d: want user:hash", path, l.n)
		}
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			return nil, fmt.Errorf("%s:%d: user %s: only bcrypt entries are accepted (htpasswd -B): %w", path, l.n, user, err)
		}
		a.users[user] = []byte(hash)
	}
	if len(a.users) == 0 {
		return nil, fmt.Errorf("%s: no users", path)
	}
	return a, nil
}

// Authenticate implements Authenticator.
func (a *HtpasswdAuth) Authenticate(r *http.Request) bool {
	user, pass, ok := r.BasicAuth()
	if !ok {
		return false
	}
	key := sha256.Sum256([]byte(user + "\x00" + pass))
	a.mu.Lock()
	until, seen := a.verified[key]
	a.mu.Unlock()
	if seen && time.Now().Before(until) {
		return true
	}
	hash, known := a.users[user]
	if !known {
		hash = dummyHash
	}
	if bcrypt.CompareHashAndPassword(hash, []byte(pass)) != nil || !known {
		return false
	}
	a.mu.Lock()
	if len(a.verified) > 1024 {
		clear(a.verified)
	}
	a.verified[key] = time.Now().Add(time.Minute)
	a.mu.Unlock()
	return true
}

// Challenge implements Authenticator.
func (a *HtpasswdAuth) Challenge() string { return `Basic realm="node-mirror"` }

type line struct {
	n    int
	text string
}

func readLines(path string) ([]line, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []line
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		t := strings.TrimSpace(sc.Text())
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		out = append(out, line{n: n, text: t})
	}
	return out, sc.Err()
}

// CheckExposure refuses to hand private images to the network: a mirror with upstream
// credentials serves whatever they can pull to whoever reaches it. Beyond loopback it
// takes TLS and client authentication, or the operator's explicit insecure choice.
func CheckExposure(listen string, tls, auth, insecure bool) error {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("listen address %q: %w", listen, err)
	}
	if ip := net.ParseIP(host); host == "localhost" || ip != nil && ip.IsLoopback() {
		return nil
	}
	if insecure || tls && auth {
		return nil
	}
	return fmt.Errorf("refusing to listen on %s: beyond loopback the mirror would hand every image its credentials can pull to anyone who can reach it; "+
		"configure --tls-cert/--tls-key and --htpasswd or --token-file, or pass --insecure-public-listen", listen)
}
