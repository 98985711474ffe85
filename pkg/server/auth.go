package server

import (
	"bufio"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
	"golang.org/x/sync/singleflight"
)

// ErrBadCredentials: the request carries no credentials, or wrong ones.
var ErrBadCredentials = errors.New("bad or missing client credentials")

// ErrBusy: the credentials could not be checked now; the client should try again soon.
var ErrBusy = errors.New("too many credential checks in progress")

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
func (a *TokenAuth) Authenticate(r *http.Request) error {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return ErrBadCredentials
	}
	h := sha256.Sum256([]byte(got))
	match := 0
	for _, t := range a.tokens {
		match |= subtle.ConstantTimeCompare(h[:], t[:])
	}
	if match != 1 {
		return ErrBadCredentials
	}
	return nil
}

// Challenge implements Authenticator.
func (a *TokenAuth) Challenge() string { return `Bearer realm="node-mirror"` }

// HtpasswdAuth accepts HTTP basic credentials checked against bcrypt htpasswd entries.
//
// bcrypt costs tens of milliseconds of CPU by design, so whoever can reach the listener
// could keep every core busy with wrong passwords. Three things bound that: at most
// MaxChecks verifications run at once and a request beyond them is answered 429 at once
// (not queued); concurrent requests with the same credentials share one verification;
// and a successful one is remembered for a while, so an engine sending the same
// credentials with every layer request pays for one bcrypt run a minute, and still gets
// in while a flood of wrong passwords takes every slot.
type HtpasswdAuth struct {
	users map[string][]byte

	// MaxChecks bounds concurrent bcrypt verifications; set before first use.
	MaxChecks int
	// compare is bcrypt.CompareHashAndPassword; tests count concurrent calls through it.
	compare func(hash, password []byte) error

	slotsOnce sync.Once
	slots     chan struct{}
	checks    singleflight.Group

	// Successes are remembered under an HMAC of the credentials with a per-process key,
	// so neither the map nor a memory dump holds anything a password can be guessed from
	// offline faster than by bcrypt.
	cacheKey [32]byte
	mu       sync.Mutex
	verified map[[sha256.Size]byte]time.Time
}

const (
	verifiedTTL = time.Minute
	// maxVerified bounds the cache; only valid credentials enter it, so a client cannot
	// grow it, and when it is full it starts over.
	maxVerified = 1024
)

// dummyHash keeps unknown users as slow as known ones.
var dummyHash, _ = bcrypt.GenerateFromPassword([]byte("node-mirror"), bcrypt.DefaultCost)

// LoadHtpasswd reads user:bcrypt-hash lines (htpasswd -B).
func LoadHtpasswd(path string) (*HtpasswdAuth, error) {
	lines, err := readLines(path)
	if err != nil {
		return nil, err
	}
	a := &HtpasswdAuth{
		users: map[string][]byte{}, verified: map[[sha256.Size]byte]time.Time{},
		MaxChecks: max(1, runtime.GOMAXPROCS(0)/2), compare: bcrypt.CompareHashAndPassword,
	}
	if _, err := rand.Read(a.cacheKey[:]); err != nil {
		return nil, err
	}
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

// credentialKey is an HMAC over the length-prefixed user and the password: with a plain
// separator, user "a\x00b" and password "c" would share a key with user "a" and
// password "b\x00c".
func (a *HtpasswdAuth) credentialKey(user, pass string) [sha256.Size]byte {
	mac := hmac.New(sha256.New, a.cacheKey[:])
	binary.Write(mac, binary.BigEndian, uint32(len(user)))
	mac.Write([]byte(user))
	mac.Write([]byte(pass))
	var k [sha256.Size]byte
	mac.Sum(k[:0])
	return k
}

// Authenticate implements Authenticator.
func (a *HtpasswdAuth) Authenticate(r *http.Request) error {
	user, pass, ok := r.BasicAuth()
	if !ok {
		return ErrBadCredentials
	}
	key := a.credentialKey(user, pass)
	if a.cached(key) {
		return nil
	}
	// The key is secret, so nobody can make unrelated credentials share a check.
	_, err, _ := a.checks.Do(string(key[:]), func() (any, error) { return nil, a.verify(key, user, pass) })
	return err
}

func (a *HtpasswdAuth) cached(key [sha256.Size]byte) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	until, seen := a.verified[key]
	return seen && time.Now().Before(until)
}

func (a *HtpasswdAuth) verify(key [sha256.Size]byte, user, pass string) error {
	// A check of the same credentials may have finished between our look and here.
	if a.cached(key) {
		return nil
	}
	a.slotsOnce.Do(func() { a.slots = make(chan struct{}, max(1, a.MaxChecks)) })
	select {
	case a.slots <- struct{}{}:
		defer func() { <-a.slots }()
	default:
		return ErrBusy
	}
	hash, known := a.users[user]
	if !known {
		hash = dummyHash
	}
	if a.compare(hash, []byte(pass)) != nil || !known {
		return ErrBadCredentials
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.verified) >= maxVerified {
		clear(a.verified)
	}
	a.verified[key] = time.Now().Add(verifiedTTL)
	return nil
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
// takes TLS and client authentication, or the operator's explicit insecure choice. The
// side listeners (metrics, pprof) follow the same rule: flag names the one checked.
func CheckExposure(flag, listen string, tls, auth, insecure bool) error {
	loopback, err := loopbackListen(listen)
	if err != nil {
		return fmt.Errorf("--%s %q: %w", flag, listen, err)
	}
	if loopback || insecure || tls && auth {
		return nil
	}
	return fmt.Errorf("refusing --%s %s: beyond loopback the mirror would hand every image its credentials can pull to anyone who can reach it; "+
		"configure --tls-cert/--tls-key and --htpasswd or --token-file, or pass --insecure-public-listen", flag, listen)
}

// CheckDebugExposure: pprof shows memory, goroutine stacks and the command line, and
// nothing in it is worth a network path; beyond loopback only by explicit choice.
func CheckDebugExposure(listen string, insecure bool) error {
	loopback, err := loopbackListen(listen)
	if err != nil {
		return fmt.Errorf("--debug-listen %q: %w", listen, err)
	}
	if loopback || insecure {
		return nil
	}
	return fmt.Errorf("refusing --debug-listen %s: profiles beyond loopback need --insecure-public-listen", listen)
}
