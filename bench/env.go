package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Contender names, as the report shows them.
const (
	nodeMirror = "node-mirror"
	reference  = "reference"
	ceiling    = "nginx"
	direct     = "direct"
)

// server is one HTTP server of the benchmark. Caches have a throttle in front of their upstream.
type server struct {
	name string
	base string // http://127.0.0.1:PORT
	proc *proc
	th   *throttle // between this cache and the upstream; nil for the others
}

func (s *server) pid() int { return s.proc.pid() }

// missingTools names the Debian packages whose programs are not installed.
func missingTools() []string {
	var missing []string
	for _, t := range []struct{ bin, pkg string }{
		{"docker-registry", "docker-registry"}, {"nginx", "nginx"}, {"containerd", "containerd"}, {"ctr", "containerd"},
	} {
		if _, err := lookPath(t.bin); err != nil && !contains(missing, t.pkg) {
			missing = append(missing, t.pkg)
		}
	}
	return missing
}

// lookPath also searches the sbin directories, which a non-root PATH may leave out (nginx).
func lookPath(bin string) (string, error) {
	if p, err := exec.LookPath(bin); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := filepath.Join(d, bin)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found", bin)
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// registryConfig is a docker-registry (distribution 2.8) configuration written from
// scratch, unlike Debian's /etc/docker/registry/config.yml, which listens on every
// address (:5000) and wants htpasswd auth: loopback only, no auth, storage in dir.
// With remote set it runs as a pull-through proxy of remote.
// With auth set, it is appended as the auth section (the upstream's token auth).
func registryConfig(addr, dir, remote, auth string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
`, dir, addr)
	if remote != "" {
		fmt.Fprintf(&b, "proxy:\n  remoteurl: %s\n", remote)
	}
	b.WriteString(auth)
	return b.String()
}

// startRegistry runs docker-registry with its own config under work/name.
func startRegistry(ctx context.Context, work, name, remote, auth string) (*server, error) {
	dir := filepath.Join(work, name)
	if err := os.MkdirAll(filepath.Join(dir, "storage"), 0o755); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cfg := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfg, []byte(registryConfig(addr, filepath.Join(dir, "storage"), remote, auth)), 0o644); err != nil {
		return nil, err
	}
	bin, err := lookPath("docker-registry")
	if err != nil {
		return nil, err
	}
	p, err := startProc(name, filepath.Join(dir, "log"), bin, "serve", cfg)
	if err != nil {
		return nil, err
	}
	s := &server{name: name, base: "http://" + addr, proc: p}
	want := 200
	if auth != "" {
		want = 401
	}
	return s, waitHTTP(ctx, p, s.base+"/v2/", want)
}

// tokenAuthConfig is the auth section for token auth with realm and the issuer's certificate.
func tokenAuthConfig(realm, certFile string) string {
	return fmt.Sprintf("auth:\n  token:\n    realm: %s\n    service: %s\n    issuer: %s\n    rootcertbundle: %s\n",
		realm, tokenService, tokenIssuer, certFile)
}

// startNodeMirror runs the node-mirror binary as shipped (default config) with docker.io
// mirrored from upstream, and pprof on debugAddr.
func startNodeMirror(ctx context.Context, work, bin, upstream, debugAddr string) (*server, error) {
	return startMirror(ctx, bin, mirrorSpec{name: nodeMirror, dir: filepath.Join(work, nodeMirror), upstream: upstream,
		args: []string{"--debug-listen", debugAddr}})
}

// mirrorSpec is one node-mirror daemon: its name in logs, its own directory (data/ and
// log), docker.io's endpoint and any further serve flags.
type mirrorSpec struct {
	name, dir, upstream string
	args                []string
}

// mirrorLogLevel is --log-level for every node-mirror the benchmark starts (-log-level).
var mirrorLogLevel = "info"

// startMirror runs a node-mirror daemon and waits until it answers /v2/.
func startMirror(ctx context.Context, bin string, spec mirrorSpec) (*server, error) {
	if err := os.MkdirAll(spec.dir, 0o755); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	argv := append([]string{bin, "serve",
		"--listen", addr, "--data-dir", filepath.Join(spec.dir, "data"),
		"--upstream", "docker.io=" + spec.upstream, "--log-level", mirrorLogLevel}, spec.args...)
	p, err := startProc(spec.name, filepath.Join(spec.dir, "log"), argv...)
	if err != nil {
		return nil, err
	}
	s := &server{name: spec.name, base: "http://" + addr, proc: p}
	return s, waitHTTP(ctx, p, s.base+"/v2/", 200)
}

// startNginx serves root as static files with sendfile: the ceiling for serving a blob.
func startNginx(ctx context.Context, work, root string) (*server, error) {
	dir := filepath.Join(work, "nginx")
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o755); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	user := ""
	if os.Geteuid() == 0 {
		user = "user root root; # the files are in the benchmark's private temp dir\n"
	}
	conf := fmt.Sprintf(`%sworker_processes auto;
daemon off;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  default_type application/octet-stream;
  client_body_temp_path %[2]s/tmp/body;
  proxy_temp_path %[2]s/tmp/proxy;
  fastcgi_temp_path %[2]s/tmp/fastcgi;
  uwsgi_temp_path %[2]s/tmp/uwsgi;
  scgi_temp_path %[2]s/tmp/scgi;
  server {
    listen %[3]s;
    root %[4]s;
  }
}
`, user, dir, addr, root)
	cfg := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	bin, err := lookPath("nginx")
	if err != nil {
		return nil, err
	}
	p, err := startProc(ceiling, filepath.Join(dir, "log"), bin, "-p", dir, "-c", cfg, "-e", filepath.Join(dir, "error.log"))
	if err != nil {
		return nil, err
	}
	s := &server{name: ceiling, base: "http://" + addr, proc: p}
	return s, waitHTTP(ctx, p, s.base+"/does-not-exist", 404)
}

// containerd is a containerd daemon of the benchmark's own: root, state and socket in the
// temp dir, the CRI plugin off, so it touches nothing of the host's.
type containerd struct {
	proc *proc
	sock string
	dir  string
	ctr  string // the ctr that goes with it
}

// engine is a containerd build: Debian's (1.6), or 2.x from -containerd2-dir.
type engine struct {
	label           string // "containerd 1.6.20~ds1"
	containerd, ctr string // binaries
}

// debianContainerd is the containerd on the PATH (Debian's package).
func debianContainerd() (engine, error) {
	bin, err := lookPath("containerd")
	if err != nil {
		return engine{}, err
	}
	ctr, err := lookPath("ctr")
	if err != nil {
		return engine{}, err
	}
	return engine{label: "containerd " + toolVersion("containerd", "--version"), containerd: bin, ctr: ctr}, nil
}

// startContainerd runs containerd e with its files in work/name.
func startContainerd(ctx context.Context, work, name string, e engine) (*containerd, error) {
	dir := filepath.Join(work, name)
	for _, d := range []string{"root", "state", "opt"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return nil, err
		}
	}
	sock := filepath.Join(dir, "containerd.sock")
	// Version 2 config: 1.6 reads it and 2.x migrates it. Plugin ids one version does not
	// have are ignored by it; 2.x's CRI is several plugins.
	conf := fmt.Sprintf(`version = 2
root = "%[1]s/root"
state = "%[1]s/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "%[2]s"
[ttrpc]
  address = "%[2]s.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "%[1]s/opt"
`, dir, sock)
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	p, err := startProc(name, filepath.Join(dir, "log"), e.containerd, "--config", cfg, "--log-level", "warn")
	if err != nil {
		return nil, err
	}
	c := &containerd{proc: p, sock: sock, dir: dir, ctr: e.ctr}
	return c, waitSocket(ctx, p, sock)
}

// hostsDir writes a containerd hosts directory that sends docker.io pulls to host (a
// cache, or the throttled upstream itself: containerd 1.6 rejects a hosts.toml without a
// host table, so all three are written alike). The server is a closed port, so a failing
// host fails the pull instead of reaching the internet.
func (c *containerd) hostsDir(name, host string) (string, error) {
	dir := filepath.Join(c.dir, "hosts-"+name)
	if err := os.MkdirAll(filepath.Join(dir, "docker.io"), 0o755); err != nil {
		return "", err
	}
	conf := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", "http://127.0.0.1:1", host)
	return dir, os.WriteFile(filepath.Join(dir, "docker.io", "hosts.toml"), []byte(conf), 0o644)
}

// fetch runs `ctr content fetch` of ref with the hosts dir and returns its wall time.
// It also returns the CPU seconds ctr itself used.
func (c *containerd) fetch(ctx context.Context, hostsDir, ref string) (time.Duration, float64, error) {
	cmd := exec.CommandContext(ctx, c.ctr, "--address", c.sock, "content", "fetch", "--hosts-dir", hostsDir, ref)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	took := time.Since(start)
	var cpu float64
	if ps := cmd.ProcessState; ps != nil {
		cpu = (ps.UserTime() + ps.SystemTime()).Seconds()
	}
	if err != nil {
		return took, cpu, fmt.Errorf("ctr content fetch %s: %v\n%s", ref, err, out)
	}
	return took, cpu, nil
}
