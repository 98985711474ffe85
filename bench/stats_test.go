package main

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"math"
	"math/big"
	"strings"
	"testing"
	"time"
)

func TestSummarize(t *testing.T) {
	for _, tc := range []struct {
		in                  sample
		med, min, max, sprd float64
	}{
		{sample{3, 1, 2}, 2, 1, 3, 100},
		{sample{4, 1, 3, 2}, 2.5, 1, 4, 120},
		{sample{5}, 5, 5, 5, 0},
	} {
		s := summarize(tc.in)
		if s.Median != tc.med || s.Min != tc.min || s.Max != tc.max || math.Abs(s.SpreadPercent-tc.sprd) > 1e-9 {
			t.Errorf("summarize(%v) = %+v, want median %v min %v max %v spread %v", tc.in, s, tc.med, tc.min, tc.max, tc.sprd)
		}
	}
	if s := summarize(nil); s.N != 0 || !math.IsNaN(s.Median) {
		t.Errorf("summarize(nil) = %+v", s)
	}
	in := sample{3, 1, 2}
	summarize(in)
	if in[0] != 3 {
		t.Error("summarize reordered its input")
	}
}

func TestRatioAndFormat(t *testing.T) {
	a, b := summarize(sample{10}), summarize(sample{4})
	if r := ratio(a, b); r != 2.5 {
		t.Errorf("ratio = %v", r)
	}
	if r := ratio(a, summarize(nil)); !math.IsNaN(r) {
		t.Errorf("ratio with a missing side = %v, want NaN", r)
	}
	for v, want := range map[float64]string{12345.6: "12346", 123.4: "123", 12.34: "12.3", 1.234: "1.23", 0.1234: "0.12", 0: "0", math.NaN(): "–"} {
		if got := fmtNum(v); got != want {
			t.Errorf("fmtNum(%v) = %q, want %q", v, got, want)
		}
	}
	if got := fmtSummary(summarize(sample{1, 2, 3})); got != "2.00 (1.00–3.00)" {
		t.Errorf("fmtSummary = %q", got)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"128MiB": 128 << 20, "40MB": 40e6, "1.5GiB": 3 << 29, "4096": 4096, "2K": 2048, " 8 MiB ": 8 << 20} {
		got, err := parseSize(in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "x", "-1MB", "MiB"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) did not fail", in)
		}
	}
}

func TestParseStat(t *testing.T) {
	// A command name with a space and a ')' must not shift the fields.
	line := "1234 (we ird) cmd) S 77 1234 1234 0 -1 4194560 500 0 0 0 250 125 3 4 20 0 8 0 100 1000000 200 18446744073709551615\n"
	st, err := parseStat(line)
	if err != nil {
		t.Fatal(err)
	}
	if st.ppid != 77 || st.utime != 250 || st.stime != 125 || st.cutime != 3 || st.cstime != 4 {
		t.Errorf("parseStat = %+v", st)
	}
	if _, err := parseStat("1 (x) S 1"); err == nil {
		t.Error("short stat line accepted")
	}
	if got := statusKB("Name:\tx\nVmHWM:\t   51200 kB\nVmRSS:\t 100 kB\n", "VmHWM"); got != 51200 {
		t.Errorf("statusKB = %d", got)
	}
}

func TestPullSizesAndRandomBytes(t *testing.T) {
	sizes := pullSizes(64<<20, 8)
	var sum int64
	for i, s := range sizes {
		sum += s
		if i > 0 && s > sizes[i-1] {
			t.Errorf("layer %d (%d) larger than the one below it (%d)", i, s, sizes[i-1])
		}
	}
	if len(sizes) != 8 || sum != 64<<20 {
		t.Errorf("pullSizes = %v (sum %d), want 8 layers summing to 64MiB", sizes, sum)
	}
	a, b := randomBytes("x", 64), randomBytes("y", 64)
	if string(a) == string(b) || string(a) != string(randomBytes("x", 64)) {
		t.Error("randomBytes must differ by name and repeat for the same name")
	}
}

func TestBaseURL(t *testing.T) {
	if got := baseURL("http://127.0.0.1:5000/v2/a/blobs/sha256:x"); got != "http://127.0.0.1:5000" {
		t.Errorf("baseURL = %q", got)
	}
}

func TestTokenMint(t *testing.T) {
	ts, err := newTokenServer()
	if err != nil {
		t.Fatal(err)
	}
	acc := parseScopes([]string{"repository:bench/hot:pull,push repository:a/b:pull"})
	if len(acc) != 2 || acc[0].Name != "bench/hot" || len(acc[0].Actions) != 2 || acc[1].Name != "a/b" {
		t.Fatalf("parseScopes = %+v", acc)
	}
	tok, err := ts.mint(acc, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d parts", len(parts))
	}
	sig, _ := base64.RawURLEncoding.DecodeString(parts[2])
	sum := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	cert, err := x509.ParseCertificate(ts.cert)
	if err != nil {
		t.Fatal(err)
	}
	pub := cert.PublicKey.(*ecdsa.PublicKey)
	if len(sig) != 64 || !ecdsa.Verify(pub, sum[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
		t.Error("token signature does not verify with the certificate's key")
	}
}
