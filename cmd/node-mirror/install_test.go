package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// After a fresh install on a host without daemon.json (Debian's default), uninstall leaves
// an empty registry-mirrors list for dockerd's reload, says a reload is needed, and offers
// --reload to send it.
func TestUninstallDockerWithoutDaemonJSON(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc/docker"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := run(t, "install", "--root", root, "--engines", "docker", "--registries", "docker.io"); err != nil {
		t.Fatalf("install: %v\n%s", err, out)
	}
	out, err := run(t, "uninstall", "--root", root)
	if err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(root, "etc/docker/daemon.json"))
	if err != nil || string(b) != "{\n  \"registry-mirrors\": []\n}\n" {
		t.Errorf("daemon.json after uninstall: %q (%v), want an empty registry-mirrors", b, err)
	}
	if !strings.Contains(out, "--reload") {
		t.Errorf("uninstall does not say dockerd needs a reload:\n%s", out)
	}
	if help, _ := run(t, "uninstall", "--help"); !strings.Contains(help, "--reload") {
		t.Errorf("uninstall has no --reload:\n%s", help)
	}
}

// --reload signals this host's daemons, so with --root it is refused before anything is
// written, not after.
func TestReloadWithRootRefusedUpFront(t *testing.T) {
	for _, args := range [][]string{
		{"install", "--engines", "docker", "--registries", "docker.io", "--reload"},
		{"uninstall", "--reload"},
	} {
		root := t.TempDir()
		if err := os.MkdirAll(filepath.Join(root, "etc/docker"), 0o755); err != nil {
			t.Fatal(err)
		}
		if args[0] == "uninstall" {
			if out, err := run(t, "install", "--root", root, "--engines", "docker", "--registries", "docker.io"); err != nil {
				t.Fatalf("install: %v\n%s", err, out)
			}
		}
		before, _ := os.ReadFile(filepath.Join(root, "etc/docker/daemon.json"))
		out, err := run(t, append(args, "--root", root)...)
		if err == nil || !strings.Contains(err.Error(), "--root") {
			t.Errorf("%s --reload --root: err %v, want a refusal naming --root\n%s", args[0], err, out)
		}
		if after, _ := os.ReadFile(filepath.Join(root, "etc/docker/daemon.json")); string(after) != string(before) {
			t.Errorf("%s --reload --root wrote daemon.json: %q -> %q", args[0], before, after)
		}
	}
}
