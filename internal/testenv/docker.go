package testenv

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Debian's docker.io: dockerd 20.10 and its CLI. The CLI is named by its path, since
// another docker may come first in PATH.
const (
	DockerdBin = "/usr/sbin/dockerd"
	DockerBin  = "/usr/bin/docker"
)

// Dockerd is a dockerd of the test's own in a private mount namespace, with its data,
// exec root (and the containerd it starts), socket and pidfile below Dir, and the scratch
// root's etc/docker mounted over /etc/docker: the daemon.json it reads, at start and on
// SIGHUP, is the one `node-mirror install --root` wrote.
type Dockerd struct {
	Dir  string
	Host string // unix://Dir/docker.sock, for docker -H

	t      testing.TB
	d      *daemon
	client string // DOCKER_CONFIG: the CLI's config of the test's own
}

// StartDockerd starts dockerd reading etcDocker as /etc/docker and waits until it
// answers. No iptables, no bridge, the vfs storage driver: nothing of the host's network
// or filesystems is touched. It needs root.
func StartDockerd(t testing.TB, etcDocker string) *Dockerd {
	t.Helper()
	requireRoot(t, "dockerd")
	for _, b := range []string{DockerdBin, DockerBin} {
		if _, err := os.Stat(b); err != nil {
			t.Fatalf("%s is missing (%v): install Debian's Docker with `apt-get install -y docker.io`", b, err)
		}
	}
	dir := shortTempDir(t, "dockerd-")
	for _, d := range []string{"data", "exec", "run", "varlib", "client"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ns := NewMountNS(t,
		Mount{Source: etcDocker, Target: "/etc/docker"},
		Mount{Source: filepath.Join(dir, "run"), Target: "/run"},
		Mount{Source: filepath.Join(dir, "varlib"), Target: "/var/lib"},
	)
	dk := &Dockerd{Dir: dir, Host: "unix://" + filepath.Join(dir, "docker.sock"), t: t, client: filepath.Join(dir, "client")}
	cmd := ns.Command(context.Background(), DockerdBin,
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"-H", dk.Host,
		"--pidfile", filepath.Join(dir, "docker.pid"),
		"--iptables=false", "--ip6tables=false", "--bridge=none",
		"--storage-driver=vfs",
		"--log-level", "warn",
	)
	dk.d = startDaemon(t, "dockerd", cmd)
	dk.d.waitReady(func() error {
		out, err := dk.Docker("version", "--format", "{{.Server.Version}}")
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	})
	return dk
}

// Docker runs Debian's docker CLI against this dockerd and returns its combined output.
// It gives up after five minutes.
func (dk *Dockerd) Docker(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, DockerBin, append([]string{"-H", dk.Host}, args...)...)
	// No credentials or helpers of the host's user: the mirror is anonymous.
	cmd.Env = append(os.Environ(), "DOCKER_CONFIG="+dk.client)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("docker %s: %w", strings.Join(args, " "), err)
	}
	return out.String(), nil
}

// MustDocker is Docker that fails the test on an error.
func (dk *Dockerd) MustDocker(args ...string) string {
	dk.t.Helper()
	out, err := dk.Docker(args...)
	if err != nil {
		dk.t.Fatalf("%v\n%s", err, out)
	}
	return out
}

// Reload sends SIGHUP: dockerd re-reads daemon.json (registry-mirrors among it).
func (dk *Dockerd) Reload() {
	dk.t.Helper()
	if err := dk.d.signal(syscall.SIGHUP); err != nil {
		dk.t.Fatalf("SIGHUP dockerd: %v", err)
	}
}

// Mirrors is the registry-mirrors dockerd uses now, as `docker info` reports them.
func (dk *Dockerd) Mirrors() ([]string, error) {
	out, err := dk.Docker("info", "--format", "{{json .RegistryConfig.Mirrors}}")
	if err != nil {
		return nil, fmt.Errorf("%w: %s", err, out)
	}
	var m []string
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		return nil, fmt.Errorf("docker info: mirrors %q: %w", out, err)
	}
	return m, nil
}

// shortTempDir is a directory below /tmp, removed when the test ends: a unix socket path
// must stay under 108 bytes, which t.TempDir()'s long names can break.
func shortTempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	return dir
}
