package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// DockerHubServer is docker.io's API endpoint, what a real hosts.toml names as server.
const DockerHubServer = "https://registry-1.docker.io"

// UnreachableServer is a loopback endpoint nothing listens on. Tests name it as the server
// in a hosts.toml so that, when the mirror fails, containerd's fallback to the server fails
// too, instead of reaching the internet or hiding the mirror's failure.
const UnreachableServer = "https://127.0.0.1:1"

// HostsTOML is a minimal containerd hosts.toml: pulls and resolves go to mirrorURL first,
// then to server.
func HostsTOML(server, mirrorURL string) string {
	return fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", server, mirrorURL)
}

// WriteHostsTOML writes dir/<registry>/hosts.toml (HostsTOML), the layout containerd reads
// with --hosts-dir or config_path.
func WriteHostsTOML(t testing.TB, dir, registry, server, mirrorURL string) {
	t.Helper()
	d := filepath.Join(dir, registry)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(HostsTOML(server, mirrorURL)), 0o644); err != nil {
		t.Fatal(err)
	}
}

// HostsDir is a fresh hosts directory sending every registry in registries to mirrorURL,
// with UnreachableServer behind it.
func HostsDir(t testing.TB, mirrorURL string, registries ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, r := range registries {
		WriteHostsTOML(t, dir, r, UnreachableServer, mirrorURL)
	}
	return dir
}
