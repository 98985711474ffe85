package hosts

import (
	"strconv"
	"strings"
	"testing"
)

// Registry names become directory names (<hosts dir>/<registry>/hosts.toml), so anything
// but a plain host[:port] could put a file somewhere else: ".." wrote
// /etc/containerd/hosts.toml. Each bad name is refused before anything is read or written,
// and the error names it.
func TestInstallRejectsBadRegistryNames(t *testing.T) {
	for _, bad := range []string{
		"..",
		".",
		"../etc",
		"../../etc/passwd",
		"a/b",
		"docker.io/library",
		`a\b`,
		"a..b",
		".docker.io",
		"docker.io.",
		"-a.io",
		"a-.io",
		"a_b.io",
		"_default",
		"Docker.io",
		"GHCR.IO:443",
		"host:",
		"host:0",
		"host:65536",
		"host:05000",
		"host:abc",
		"host:+80",
		"host:5000:5000",
		"::1",
		"fd00::1:5000",
		"[::1",
		"[::1]x",
		"[::1]:",
		"[fe80::1%eth0]",
		"[1.2.3.4]",
		"[]",
		"user@host",
		"host?x",
		"host#x",
		"a b",
		"ho\nst",
		"ho\x00st",
		"%2e%2e",
		"999.1.1.1",
		"1.2.3.04",
		strings.Repeat("a", 64) + ".io",
		strings.Repeat("abcdefgh.", 29) + "io", // 263 characters, every label short
		"dоcker.io",                            // Cyrillic o
	} {
		t.Run(bad, func(t *testing.T) {
			root := t.TempDir()
			before := snapshot(t, root)
			_, err := Install(Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io", bad}, Engines: Engines})
			if err == nil {
				t.Fatalf("registry %q accepted", bad)
			}
			if !strings.Contains(err.Error(), strconv.Quote(bad)) {
				t.Errorf("error %q does not name %q", err, bad)
			}
			if d := diffTrees(before, snapshot(t, root)); len(d) > 0 {
				t.Errorf("a refused install wrote %v", d)
			}
		})
	}
}

// The registries the mirror serves stand in for "*" in the containers drop-in: they are
// checked as well.
func TestInstallRejectsBadServedNames(t *testing.T) {
	root := t.TempDir()
	_, err := Install(Options{Root: root, MirrorURL: testMirror, Registries: []string{Wildcard}, Served: []string{"docker.io", "x\"]\n[evil"}, Engines: []string{CRIO}})
	if err == nil || !strings.Contains(err.Error(), strconv.Quote("x\"]\n[evil")) {
		t.Fatalf("err = %v, want the bad served name refused", err)
	}
}
