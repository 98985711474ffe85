package regname

import (
	"strconv"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"docker.io", true},
		{"registry.k8s.io", true},
		{"localhost", true},
		{"localhost:5001", true},
		{"127.0.0.1:5000", true},
		{"10.0.0.1", true},
		{"[::1]:5000", true},
		{"[fd00::1]", true},
		{"a.b-c.io", true},
		{"xn--bcher-kva.example", true},
		{"registry:65535", true},
		{"1password.example", true},
		{strings.Repeat("a", 63) + ".io", true},
		{strings.Repeat("abcdefgh.", 27) + "io", true}, // 245 characters
		{strings.Repeat("abcdefgh.", 27) + "io:65535", true},

		// Path tricks: a name becomes a directory and a URL's host.
		{"", false},
		{"..", false},
		{".", false},
		{"../etc", false},
		{"../../etc/passwd", false},
		{"a/b", false},
		{"docker.io/library", false},
		{`a\b`, false},
		{"a..b", false},
		{".docker.io", false},
		{"docker.io.", false},
		{"%2e%2e", false},
		// Not a DNS label.
		{"-a.io", false},
		{"a-.io", false},
		{"a_b.io", false},
		{"_default", false},
		{"a b", false},
		{"ho\nst", false},
		{"ho\x00st", false},
		{"dоcker.io", false}, // Cyrillic o
		// Upper case never matches what references spell.
		{"Docker.io", false},
		{"GHCR.IO:443", false},
		// Ports.
		{"host:", false},
		{"host:0", false},
		{"host:65536", false},
		{"host:05000", false},
		{"host:abc", false},
		{"host:+80", false},
		{"host:5000:5000", false},
		// IP literals.
		{"::1", false},
		{"fd00::1:5000", false},
		{"[::1", false},
		{"[::1]x", false},
		{"[::1]:", false},
		{"[fe80::1%eth0]", false},
		{"[1.2.3.4]", false},
		{"[::0A]", false}, // found by FuzzRegistryName
		{"[FD00::1]:5000", false},
		{"[]", false},
		{"999.1.1.1", false},
		{"1.2.3.04", false},
		// URL parts.
		{"user@host", false},
		{"host?x", false},
		{"host#x", false},
		{"https://docker.io", false},
		// Bounded length.
		{strings.Repeat("a", 64) + ".io", false},
		{strings.Repeat("abcdefgh.", 29) + "io", false}, // 263 characters, every label short
		{strings.Repeat("a.", 4096) + "io", false},
	} {
		err := Check(tc.name)
		if tc.ok != (err == nil) {
			t.Errorf("Check(%q) = %v, want ok %v", tc.name, err, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), strconv.Quote(tc.name)) {
			t.Errorf("Check(%q): error %q does not name it", tc.name, err)
		}
	}
}

func TestCheckRepo(t *testing.T) {
	for _, tc := range []struct {
		repo string
		ok   bool
	}{
		{"library/nginx", true},
		{"a", true},
		{"team/sub-group/app.v2", true},
		{"a__b/c_d/e--f", true},
		{strings.Repeat("a", 255), true},
		{strings.Repeat("a", 256), false},
		{"", false},
		{"Library/nginx", false},
		{"a//b", false},
		{"/a", false},
		{"a/", false},
		{"../etc", false},
		{"a/./b", false},
		{"a___b", false},
		{"-a", false},
		{"a.", false},
		{"a b", false},
		{"a%2Fb", false},
	} {
		if err := CheckRepo(tc.repo); (err == nil) != tc.ok {
			t.Errorf("CheckRepo(%q) = %v, want ok %v", tc.repo, err, tc.ok)
		}
	}
}
