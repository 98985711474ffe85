package service

import (
	"bufio"
	"bytes"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/node-mirror/node-mirror/internal/testenv"
)

// unitFile is a parsed systemd unit: section → key → values in order.
type unitFile map[string]map[string][]string

func parseUnit(t testing.TB, b []byte) unitFile {
	t.Helper()
	u := unitFile{}
	sec := ""
	s := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; s.Scan(); n++ {
		line := strings.TrimSpace(s.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && line[len(line)-1] == ']':
			sec = line[1 : len(line)-1]
			u[sec] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || sec == "" || strings.HasSuffix(line, "\\") {
				t.Fatalf("unit line %d: cannot parse %q", n, line)
			}
			u[sec][k] = append(u[sec][k], v)
		}
	}
	return u
}

func (u unitFile) get(sec, key string) []string { return u[sec][key] }

func readUnit(t testing.TB) unitFile {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "systemd/node-mirror.service"))
	if err != nil {
		t.Fatal(err)
	}
	return parseUnit(t, b)
}

// verifyUnit runs `systemd-analyze verify` on text and fails on any word about the unit.
func verifyUnit(t testing.TB, text string) {
	t.Helper()
	needTool(t, "systemd-analyze", "systemd")
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "node-mirror.service"), []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("systemd-analyze", "verify", "./node-mirror.service")
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("node-mirror.service")) {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// The settings issue 6 asks for are there, and ExecStart uses flags serve has.
func TestUnitSettings(t *testing.T) {
	u := readUnit(t)
	want := map[string]string{
		"Type": "notify", "Restart": "on-failure", "StateDirectory": "node-mirror",
		"ExecReload": "/bin/kill -HUP $MAINPID", "DynamicUser": "yes",
		"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
		"NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
		"RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "SystemCallArchitectures": "native",
		"ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
		"ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
		"ProtectProc": "invisible", "ProcSubset": "pid", "LockPersonality": "yes",
		"MemoryDenyWriteExecute": "yes", "RestrictNamespaces": "yes", "RestrictRealtime": "yes",
		"RestrictSUIDSGID": "yes", "RemoveIPC": "yes", "UMask": "0077",
	}
	for k, v := range want {
		if got := u.get("Service", k); len(got) != 1 || got[0] != v {
			t.Errorf("[Service] %s = %q, want %q", k, got, v)
		}
	}
	if f := u.get("Service", "SystemCallFilter"); len(f) == 0 || f[0] != "@system-service" {
		t.Errorf("SystemCallFilter = %q, want @system-service first", f)
	}
	if d := u.get("Service", "IPAddressDeny"); slices.Contains(d, "any") {
		t.Errorf("IPAddressDeny = %q: the mirror must reach registries on the internet", d)
	}

	argv := strings.Fields(u.get("Service", "ExecStart")[0])
	if len(argv) < 2 || argv[0] != "/usr/local/bin/node-mirror" || argv[1] != "serve" {
		t.Fatalf("ExecStart = %q, want /usr/local/bin/node-mirror serve …", argv)
	}
	// The data dir is the StateDirectory (the only writable place under ProtectSystem=strict).
	if i := slices.Index(argv, "--data-dir"); i < 0 || i+1 == len(argv) || argv[i+1] != "/var/lib/node-mirror" {
		t.Errorf("ExecStart %q does not pass --data-dir /var/lib/node-mirror", argv)
	}
	help := helpOf(t, "serve")
	for _, a := range argv[2:] {
		if strings.HasPrefix(a, "--") && !strings.Contains(help, a+" ") {
			t.Errorf("ExecStart flag %s is not in `node-mirror serve --help`", a)
		}
	}
}

// helpOf is `node-mirror <cmd> --help`.
func helpOf(t testing.TB, cmd string) string {
	t.Helper()
	out, err := exec.Command(nodeMirrorBin, cmd, "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("node-mirror %s --help: %v\n%s", cmd, err, out)
	}
	return string(out)
}

// expandSyscallGroup lists the system calls in a systemd group (or a single call).
func expandSyscallGroup(t testing.TB, g string, seen map[string][]string) []string {
	t.Helper()
	if !strings.HasPrefix(g, "@") {
		return []string{g}
	}
	if s, ok := seen[g]; ok {
		return s
	}
	out, err := exec.Command("systemd-analyze", "syscall-filter", g).Output()
	if err != nil {
		t.Fatalf("systemd-analyze syscall-filter %s: %v", g, err)
	}
	var calls []string
	for _, l := range strings.Split(string(out), "\n")[1:] {
		l = strings.TrimSpace(l)
		if l == "" || l[0] == '#' {
			continue
		}
		calls = append(calls, expandSyscallGroup(t, l, seen)...)
	}
	seen[g] = calls
	return calls
}

// allowedSyscalls evaluates the unit's SystemCallFilter= lines as systemd does: the first
// line without ~ starts an allow list, ~ lines remove from it.
func allowedSyscalls(t testing.TB, filters []string) map[string]bool {
	t.Helper()
	seen := map[string][]string{}
	allowed := map[string]bool{}
	for _, f := range filters {
		deny := strings.HasPrefix(f, "~")
		for _, g := range strings.Fields(strings.TrimPrefix(f, "~")) {
			for _, c := range expandSyscallGroup(t, g, seen) {
				allowed[c] = !deny
			}
		}
	}
	return allowed
}

// Procfs files outside /proc/<pid> that ProcSubset=pid hides, which the daemon reads and
// does without: each has a reason.
var hiddenProcOK = map[string]string{
	"/proc/stat":                   "prometheus' process collector: boot time for process_start_time_seconds, left out when unreadable",
	"/proc/sys/net/core/somaxconn": "Go's net package: listen backlog, defaults when unreadable",
}

var (
	straceLine = regexp.MustCompile(`^\d+\s+([a-z_0-9]+)\((.*)$`)
	quotedPath = regexp.MustCompile(`"(/[^"]*)"`)
	writeFlags = regexp.MustCompile(`O_WRONLY|O_RDWR|O_CREAT|O_TRUNC`)
)

// TestUnitSandboxFitsDaemon runs the daemon under strace through what it does in service —
// sd_notify, a cold and a warm pull, /readyz, /metrics, a SIGHUP reload, a SIGTERM stop —
// and checks every system call against the unit's SystemCallFilter=, every socket against
// RestrictAddressFamilies=, every mapping against MemoryDenyWriteExecute=, every write
// against ProtectSystem=strict (only the data dir and /tmp), and /proc reads against
// ProcSubset=pid. systemd-analyze only rates the unit; this shows the daemon runs in it.
func TestUnitSandboxFitsDaemon(t *testing.T) {
	strace := needTool(t, "strace", "strace")
	needTool(t, "systemd-analyze", "systemd")
	u := readUnit(t)

	// Upstream: an in-process registry on loopback with one image.
	up := testenv.NewUpstream(t)
	up.PushRandomImage("library/app", "1", 3, 1<<20)

	dir := t.TempDir()
	data, tmp := filepath.Join(dir, "data"), filepath.Join(dir, "tmp")
	for _, d := range []string{data, tmp} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// Port 0: the daemon writes the address it bound to --ready-file (in the sandbox's
	// TMPDIR, where the unit lets it write).
	readyFile := filepath.Join(tmp, "ready")
	conf := filepath.Join(dir, "config.toml")
	writeConf := func(extra string) {
		t.Helper()
		c := fmt.Sprintf("listen = \"127.0.0.1:0\"\n[[registry]]\nname = \"docker.io\"\nendpoints = [%q]\n%s", up.URL(), extra)
		if err := os.WriteFile(conf, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeConf("")

	// The sd_notify socket, as systemd would pass it with Type=notify.
	notifyPath := filepath.Join(dir, "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	ready := make(chan string, 4)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := notify.Read(buf)
			if err != nil {
				return
			}
			ready <- string(buf[:n])
		}
	}()

	trace := filepath.Join(dir, "trace")
	cmd := exec.Command(strace, "-f", "-qq", "-s", "4096", "-o", trace,
		nodeMirrorBin, "serve", "--config", conf, "--data-dir", data, "--ready-file", readyFile)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notifyPath, "TMPDIR="+tmp)
	d := startDaemon(t, cmd)
	d.traced(t, nodeMirrorBin)

	select {
	case m := <-ready:
		if !strings.Contains(m, "READY=1") {
			t.Fatalf("first sd_notify message %q, want READY=1", m)
		}
	case <-d.done:
		t.Fatalf("daemon exited before READY=1: %v", d.err)
	case <-time.After(30 * time.Second):
		t.Fatal("no READY=1 on $NOTIFY_SOCKET within 30 s")
	}
	// READY=1 promises a listening port and an open store.
	listen := d.readyAddr(t, readyFile, 10*time.Second)
	waitStatus(t, "http://"+listen+"/readyz", http.StatusOK, time.Second)

	mirrorRef, err := name.ParseReference(listen+"/library/app:1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	for _, pass := range []string{"cold", "warm"} {
		got, err := remote.Image(mirrorRef)
		if err != nil {
			t.Fatalf("%s pull: %v", pass, err)
		}
		if err := validate.Image(got); err != nil {
			t.Fatalf("%s pull: %v", pass, err)
		}
	}
	waitStatus(t, "http://"+listen+"/metrics", http.StatusOK, 5*time.Second)
	waitStatus(t, "http://"+listen+"/healthz", http.StatusOK, 5*time.Second)

	// ExecReload= sends SIGHUP.
	writeConf("[[registry]]\nname = \"ghcr.io\"\n")
	d.signal(t, syscall.SIGHUP)
	d.waitLog(t, "config reloaded", 10*time.Second)
	d.stop(t)

	f, err := os.Open(trace)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	allowed := allowedSyscalls(t, u.get("Service", "SystemCallFilter"))
	families := strings.Fields(u.get("Service", "RestrictAddressFamilies")[0])
	problems := map[string]bool{}
	problem := func(format string, a ...any) { problems[fmt.Sprintf(format, a...)] = true }
	calls := map[string]bool{}
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		m := straceLine.FindStringSubmatch(s.Text())
		if m == nil {
			continue // resumed calls, signals, exits
		}
		call, args := m[1], m[2]
		calls[call] = true
		if call == "execve" {
			continue // strace starting the daemon, before any filter would apply
		}
		if !allowed[call] {
			problem("system call %s is not allowed by SystemCallFilter=", call)
		}
		switch call {
		case "socket":
			fam, _, _ := strings.Cut(args, ",")
			if !slices.Contains(families, fam) {
				problem("socket(%s) is not in RestrictAddressFamilies=", fam)
			}
		case "mmap", "mprotect", "pkey_mprotect":
			if strings.Contains(args, "PROT_WRITE") && strings.Contains(args, "PROT_EXEC") {
				problem("%s with PROT_WRITE|PROT_EXEC breaks MemoryDenyWriteExecute=", call)
			}
		}
		paths := quotedPath.FindAllStringSubmatch(args, -1)
		writes := call == "mkdirat" || call == "renameat" || call == "renameat2" || call == "unlinkat" ||
			call == "linkat" || call == "symlinkat" || call == "fchmodat" ||
			((call == "openat" || call == "open" || call == "creat") && writeFlags.MatchString(args))
		for _, p := range paths {
			path := p[1]
			if writes && !within(path, data) && !within(path, tmp) && path != "/dev/null" {
				problem("%s writes %s: ProtectSystem=strict allows only the data dir and /tmp", call, path)
			}
			if rest, ok := strings.CutPrefix(path, "/proc/"); ok {
				first, _, _ := strings.Cut(rest, "/")
				if first != "self" && first != "thread-self" && strings.Trim(first, "0123456789") != "" {
					if _, ok := hiddenProcOK[path]; !ok {
						problem("%s reads %s, which ProcSubset=pid hides", call, path)
					}
				}
			}
		}
	}
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	if len(calls) < 20 {
		t.Fatalf("strace saw only %d distinct system calls; is %s the trace?", len(calls), trace)
	}
	for _, p := range slices.Sorted(maps.Keys(problems)) {
		t.Error(p)
	}
	if len(problems) == 0 {
		t.Logf("%d distinct system calls, all within the unit's sandbox", len(calls))
	}
}

func within(path, dir string) bool {
	return path == dir || strings.HasPrefix(path, dir+"/")
}
