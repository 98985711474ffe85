package testenv

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// SkopeoBin is Debian's skopeo.
const SkopeoBin = "/usr/bin/skopeo"

// Skopeo runs skopeo with a trust policy of the test's own and a registries.conf of the
// test's own (registriesConf, its text; empty means no registries at all), so the host's
// /etc/containers changes little of what the test does. The test fails, with the install command,
// when skopeo is missing.
func Skopeo(t testing.TB, registriesConf string, args ...string) (string, error) {
	t.Helper()
	if _, err := os.Stat(SkopeoBin); err != nil {
		t.Fatalf("%s is missing (%v): install Debian's skopeo with `apt-get install -y skopeo`", SkopeoBin, err)
	}
	dir := t.TempDir()
	policy := filepath.Join(dir, "policy.json")
	if err := os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "registries.conf")
	if err := os.WriteFile(conf, []byte(registriesConf), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// --registries-conf is hidden in skopeo 1.9's help, and it ignores
	// CONTAINERS_REGISTRIES_CONF. Drop-ins in /etc/containers/registries.conf.d still apply.
	full := append([]string{"--policy", policy, "--registries-conf", conf, "--tmpdir", dir}, args...)
	cmd := exec.CommandContext(ctx, SkopeoBin, full...)
	// No credentials of the host's user: the mirror is anonymous.
	cmd.Env = append(os.Environ(), "REGISTRY_AUTH_FILE="+filepath.Join(dir, "auth.json"))
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("skopeo %s: %w", strings.Join(args, " "), err)
	}
	return out.String(), nil
}

// RegistriesConfMirror is a containers registries.conf (v2) that pulls registry through
// the mirror at location (host:port/path, as `node-mirror install` writes it for CRI-O and
// Podman), over plain HTTP, with UnreachableServer's host as the registry's own location.
func RegistriesConfMirror(registry, location string) string {
	return fmt.Sprintf(`unqualified-search-registries = []

[[registry]]
prefix = %q
location = "127.0.0.1:1"

[[registry.mirror]]
location = %q
insecure = true
`, registry, location)
}
