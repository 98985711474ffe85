package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"strings"
	"time"
)

// tokenServer is an anonymous Docker token service for the upstream registry, as Docker Hub,
// ghcr.io and quay.io have: every client (node-mirror, the reference, containerd, the
// seeder) first gets a 401 with a Bearer challenge and fetches a token. Besides being what
// caches meet in real life, it matters to the comparison: distribution 2.8's proxy pings
// an upstream that sends no challenge again on every request, under a global lock, which
// would make the reference look far slower than it is against a real registry.
// It is served by the upstream's front (front.go) on the registry's own host:port.
type tokenServer struct {
	key  *ecdsa.PrivateKey
	cert []byte // DER, self-signed; the registry trusts it through rootcertbundle
}

const (
	tokenService = "bench-upstream"
	tokenIssuer  = "bench-token-issuer"
)

func newTokenServer() (*tokenServer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: tokenIssuer},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(48 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	return &tokenServer{key: key, cert: der}, nil
}

// certPEM is the bundle the registry's auth.token.rootcertbundle points at.
func (t *tokenServer) certPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: t.cert})
}

type access struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

// parseScopes turns scope=repository:bench/hot:pull,push parameters into access claims,
// granting everything asked for.
func parseScopes(scopes []string) []access {
	out := []access{}
	for _, s := range scopes {
		for _, one := range strings.Fields(s) {
			typ, rest, ok := strings.Cut(one, ":")
			if !ok {
				continue
			}
			i := strings.LastIndexByte(rest, ':')
			if i < 0 {
				continue
			}
			out = append(out, access{Type: typ, Name: rest[:i], Actions: strings.Split(rest[i+1:], ",")})
		}
	}
	return out
}

func (t *tokenServer) serveToken(w http.ResponseWriter, r *http.Request) {
	r.ParseForm()
	tok, err := t.mint(parseScopes(r.Form["scope"]), time.Now())
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"token": tok, "access_token": tok, "expires_in": 3600, "issued_at": time.Now().UTC().Format(time.RFC3339),
	})
}

// mint signs an ES256 JWT in the form distribution's token auth verifies: the signing
// certificate in x5c, issuer, audience (the service) and the granted access.
func (t *tokenServer) mint(acc []access, now time.Time) (string, error) {
	enc := base64.RawURLEncoding
	header, _ := json.Marshal(map[string]any{"typ": "JWT", "alg": "ES256", "x5c": []string{base64.StdEncoding.EncodeToString(t.cert)}})
	jti := make([]byte, 8)
	rand.Read(jti)
	claims, _ := json.Marshal(map[string]any{
		"iss": tokenIssuer, "sub": "", "aud": tokenService,
		"exp": now.Add(time.Hour).Unix(), "nbf": now.Add(-time.Minute).Unix(), "iat": now.Add(-time.Minute).Unix(),
		"jti": hex.EncodeToString(jti), "access": acc,
	})
	signing := enc.EncodeToString(header) + "." + enc.EncodeToString(claims)
	sum := sha256.Sum256([]byte(signing))
	rr, ss, err := ecdsa.Sign(rand.Reader, t.key, sum[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64) // JWS ES256: R and S, 32 bytes each, big-endian
	rr.FillBytes(sig[:32])
	ss.FillBytes(sig[32:])
	return signing + "." + enc.EncodeToString(sig), nil
}
