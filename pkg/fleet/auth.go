package fleet

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"strconv"
	"time"
)

// Request authentication headers.
const (
	HeaderPeer      = "X-Node-Mirror-Peer"
	HeaderTime      = "X-Node-Mirror-Time"
	HeaderSignature = "X-Node-Mirror-Signature"
)

const (
	// signatureWindow is how far a request's timestamp may be from the receiver's clock,
	// either way. It bounds how long a captured request can be replayed (for the same
	// chunk only: the signature covers the exact request) and must cover clock skew
	// between members; NTP keeps a LAN far within it.
	signatureWindow = 30 * time.Second
	maxPeerNameLen  = 128
)

// signer signs and verifies peer requests with the request-signing key derived from the
// fleet key.
type signer struct {
	key []byte
}

// mac is HMAC-SHA256 over a versioned, newline-separated string of the method, the exact
// request target (path and raw query as sent on the wire), the timestamp and the sender's
// name. None of the fields can contain a newline (Go refuses such methods and targets; the
// name is checked), so no two requests share a signed string.
func (s signer) mac(method, target, ts, peer string) []byte {
	m := hmac.New(sha256.New, s.key)
	for _, f := range []string{"node-mirror-peer-v1", method, target, ts, peer} {
		m.Write([]byte(f))
		m.Write([]byte{'\n'})
	}
	return m.Sum(nil)
}

// sign sets the authentication headers on an outgoing request, as peer, at time now.
func (s signer) sign(r *http.Request, peer string, now time.Time) {
	ts := strconv.FormatInt(now.Unix(), 10)
	r.Header.Set(HeaderPeer, peer)
	r.Header.Set(HeaderTime, ts)
	r.Header.Set(HeaderSignature, hex.EncodeToString(s.mac(r.Method, r.URL.RequestURI(), ts, peer)))
}

// verify checks an incoming request's headers and returns the sender's name. It says only
// yes or no: a sender without the key learns nothing from the refusal.
func (s signer) verify(r *http.Request, now time.Time) (peer string, ok bool) {
	peer = r.Header.Get(HeaderPeer)
	ts := r.Header.Get(HeaderTime)
	sig := r.Header.Get(HeaderSignature)
	if !validPeerName(peer) || ts == "" || len(ts) > 20 || len(sig) != 2*sha256.Size {
		return "", false
	}
	// Exactly one of each header: a second copy could mean different things to a proxy.
	if len(r.Header.Values(HeaderPeer)) != 1 || len(r.Header.Values(HeaderTime)) != 1 ||
		len(r.Header.Values(HeaderSignature)) != 1 {
		return "", false
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || strconv.FormatInt(sec, 10) != ts {
		return "", false
	}
	d := now.Sub(time.Unix(sec, 0))
	if d > signatureWindow || d < -signatureWindow {
		return "", false
	}
	got, err := hex.DecodeString(sig)
	if err != nil {
		return "", false
	}
	// RequestURI is the target exactly as it came on the wire: the signature covers the
	// bytes the sender sent, not our re-encoding of them.
	if !hmac.Equal(got, s.mac(r.Method, r.RequestURI, ts, peer)) {
		return "", false
	}
	return peer, true
}

// validPeerName bounds the names a sender may claim: printable ASCII without spaces,
// short. Members are named by their operators (host names by default).
func validPeerName(s string) bool {
	if s == "" || len(s) > maxPeerNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}
