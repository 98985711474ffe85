package testenv

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// PodmanBin is Debian's podman (4.3).
const PodmanBin = "/usr/bin/podman"

// Podman runs podman in a private mount namespace with storage of the test's own
// (--root, --runroot, the vfs driver) and the scratch root's etc/containers mounted over
// /etc/containers, so registries.conf.d holds the drop-in `node-mirror install --root`
// wrote. podman writes below /var/lib/containers, /run and /var/tmp whatever --root says:
// those are directories below Dir in the namespace, and so are its network configs.
type Podman struct {
	Dir string

	t  testing.TB
	ns *MountNS
}

// NewPodman prepares the namespace podman commands run in. It needs root.
func NewPodman(t testing.TB, etcContainers string) *Podman {
	t.Helper()
	requireRoot(t, "podman")
	if _, err := os.Stat(PodmanBin); err != nil {
		t.Fatalf("%s is missing (%v): install Debian's podman with `apt-get install -y podman`", PodmanBin, err)
	}
	dir := shortTempDir(t, "podman-")
	for _, d := range []string{"root", "runroot", "run", "varlib", "vartmp", "home", "networks"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ns := NewMountNS(t,
		Mount{Source: etcContainers, Target: "/etc/containers"},
		Mount{Source: filepath.Join(dir, "run"), Target: "/run"},
		Mount{Source: filepath.Join(dir, "varlib"), Target: "/var/lib"},
		Mount{Source: filepath.Join(dir, "vartmp"), Target: "/var/tmp"},
	)
	return &Podman{Dir: dir, t: t, ns: ns}
}

// Podman runs `podman <global flags> args...` in the namespace and returns its combined
// output. It gives up after five minutes.
func (p *Podman) Podman(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	full := append([]string{
		"--root", filepath.Join(p.Dir, "root"),
		"--runroot", filepath.Join(p.Dir, "runroot"),
		"--storage-driver", "vfs",
		"--cgroup-manager", "cgroupfs",
		"--events-backend", "none",
		// netavark writes its network configs to /etc/containers/networks, CNI its
		// default network to /etc/cni/net.d: neither belongs to what install wrote.
		"--network-config-dir", filepath.Join(p.Dir, "networks"),
	}, args...)
	cmd := p.ns.Command(ctx, PodmanBin, full...)
	// A home of its own: containers/image prefers ~/.config/containers/registries.conf
	// over /etc's, and the host's user may have one, or credentials (the others live in
	// /run/containers, private here).
	cmd.Env = append(os.Environ(), "HOME="+filepath.Join(p.Dir, "home"))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("podman %s: %w", strings.Join(args, " "), err)
	}
	return out.String(), nil
}

// MustPodman is Podman that fails the test on an error.
func (p *Podman) MustPodman(args ...string) string {
	p.t.Helper()
	out, err := p.Podman(args...)
	if err != nil {
		p.t.Fatalf("%v\n%s", err, out)
	}
	return out
}
