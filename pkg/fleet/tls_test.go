package fleet

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// writeCA makes a CA and a serving certificate for 127.0.0.1 signed by it, and returns
// the paths of the CA certificate, the serving certificate and its key.
func writeCA(t *testing.T) (ca, cert, key string) {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "fleet test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "member"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(leafKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return write("ca.pem", "CERTIFICATE", caDER), write("cert.pem", "CERTIFICATE", leafDER), write("key.pem", "EC PRIVATE KEY", keyDER)
}

func TestPeerTLS(t *testing.T) {
	ca, cert, key := writeCA(t)
	otherCA, _, _ := writeCA(t)
	withTLS := func(ca string) nodeOpt {
		return func(c *Config) { c.PeerTLS = PeerTLS{Cert: cert, Key: key, CA: ca} }
	}
	blob := testBlob(100_000)
	a := startNode(t, "node-a", newBlobSource(blob), withTLS(ca))
	b := startNode(t, "node-b", nil, withTLS(ca))
	target := Member{Name: "node-a", PeerAddr: a.cfg.PeerAdvertise}

	rc, err := b.Fetch(context.Background(), target, chunkReq(blob, 100, 50_000))
	if err != nil {
		t.Fatalf("Fetch over TLS: %v", err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || string(got) != string(blob[100:50_100]) {
		t.Fatalf("read %d bytes over TLS, err %v", len(got), err)
	}

	// A member that trusts another CA does not talk to it; nor does one without TLS.
	c := startNode(t, "node-c", nil, withTLS(otherCA))
	if _, err := c.Fetch(context.Background(), target, chunkReq(blob, 0, 10)); err == nil {
		t.Fatal("Fetch trusting another CA succeeded")
	}
	d := startNode(t, "node-d", nil)
	if _, err := d.Fetch(context.Background(), target, chunkReq(blob, 0, 10)); err == nil {
		t.Fatal("plain HTTP Fetch from a TLS peer succeeded")
	}
	if n := a.src.callCount(); n != 1 {
		t.Fatalf("source called %d times, want once", n)
	}
}

func TestStartRejectsBadConfig(t *testing.T) {
	_, cert, key := writeCA(t)
	base := Config{NodeName: "n", GossipListen: "127.0.0.1:0", PeerAdvertise: "127.0.0.1:5001", Key: testKey}
	tests := []struct {
		name string
		mod  func(*Config)
	}{
		{"short key", func(c *Config) { c.Key = testKey[:16] }},
		{"no key", func(c *Config) { c.Key = nil }},
		{"no peer advertise", func(c *Config) { c.PeerAdvertise = "" }},
		{"peer advertise without port", func(c *Config) { c.PeerAdvertise = "10.0.0.1" }},
		{"peer advertise unspecified", func(c *Config) { c.PeerAdvertise = "0.0.0.0:5001" }},
		{"peer advertise port 0", func(c *Config) { c.PeerAdvertise = "10.0.0.1:0" }},
		{"gossip by name", func(c *Config) { c.GossipListen = "localhost:0" }},
		{"gossip without port", func(c *Config) { c.GossipListen = "127.0.0.1" }},
		{"gossip bad port", func(c *Config) { c.GossipListen = "127.0.0.1:99999" }},
		{"node name with space", func(c *Config) { c.NodeName = "a b" }},
		{"TLS cert without key", func(c *Config) { c.PeerTLS = PeerTLS{Cert: cert} }},
		{"TLS key without cert", func(c *Config) { c.PeerTLS = PeerTLS{Key: key} }},
		{"TLS CA missing", func(c *Config) { c.PeerTLS = PeerTLS{Cert: cert, Key: key, CA: "/nonexistent"} }},
		{"TLS CA not PEM", func(c *Config) { c.PeerTLS = PeerTLS{Cert: cert, Key: key, CA: key} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := base
			tt.mod(&cfg)
			f, err := Start(context.Background(), cfg)
			if err == nil {
				f.Close()
				t.Fatal("Start succeeded")
			}
			t.Log(err)
		})
	}
	// A gossip port in use is an error, not a silent second choice.
	f := startNode(t, "first", nil)
	cfg := base
	cfg.GossipListen = f.GossipAddr()
	if g, err := Start(context.Background(), cfg); err == nil {
		g.Close()
		t.Fatal("Start on a busy gossip port succeeded")
	}
}
