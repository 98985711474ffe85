package service

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/node-mirror/node-mirror/pkg/hosts"
)

func makeInstall(t *testing.T, destdir string, vars ...string) string {
	t.Helper()
	needTool(t, "make", "make")
	args := append([]string{"--no-print-directory", "-C", repoRoot(t), "install", "DESTDIR=" + destdir}, vars...)
	out, err := exec.Command("make", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("make %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// `make install DESTDIR=… PREFIX=/usr` puts binary, unit and config where docs/service.md
// says, with the unit's paths following PREFIX, and never overwrites an existing config.
func TestMakeInstall(t *testing.T) {
	root := repoRoot(t)
	dest := t.TempDir()
	out := makeInstall(t, dest, "PREFIX=/usr")

	bin := filepath.Join(dest, "usr/bin/node-mirror")
	fi, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o755 {
		t.Errorf("%s: mode %v, want 0755", bin, fi.Mode().Perm())
	}
	if v, err := exec.Command(bin, "serve", "--help").CombinedOutput(); err != nil || !strings.Contains(string(v), "--data-dir") {
		t.Errorf("installed binary does not run: %v\n%s", err, v)
	}

	unitPath := filepath.Join(dest, "etc/systemd/system/node-mirror.service")
	unit, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(unitPath); fi.Mode().Perm() != 0o644 {
		t.Errorf("%s: mode %v, want 0644", unitPath, fi.Mode().Perm())
	}
	u := parseUnit(t, unit)
	wantExec := "/usr/bin/node-mirror serve --config /etc/node-mirror/config.toml --data-dir /var/lib/node-mirror"
	if got := u.get("Service", "ExecStart"); len(got) != 1 || got[0] != wantExec {
		t.Errorf("installed ExecStart = %q, want %q", got, wantExec)
	}
	if bytes.Contains(unit, []byte("/usr/local/bin/node-mirror")) {
		t.Errorf("installed unit still names /usr/local with PREFIX=/usr:\n%s", unit)
	}
	// Apart from the PREFIX substitution it is the unit in the repository.
	src, err := os.ReadFile(filepath.Join(root, "systemd/node-mirror.service"))
	if err != nil {
		t.Fatal(err)
	}
	if want := strings.ReplaceAll(string(src), "/usr/local/bin/node-mirror", "/usr/bin/node-mirror"); string(unit) != want {
		t.Errorf("installed unit differs from systemd/node-mirror.service beyond PREFIX")
	}
	// The installed unit, with its ExecStart pointing into DESTDIR, verifies cleanly.
	verifyUnit(t, strings.ReplaceAll(string(unit), "/usr/bin/node-mirror", bin))

	conf := filepath.Join(dest, "etc/node-mirror/config.toml")
	example, err := os.ReadFile(filepath.Join(root, "examples/config.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(conf); err != nil || !bytes.Equal(got, example) {
		t.Errorf("%s is not examples/config.toml (err %v)", conf, err)
	}
	if fi, _ := os.Stat(conf); fi.Mode().Perm() != 0o644 {
		// DynamicUser= runs the daemon as a transient user: it must be able to read it.
		t.Errorf("%s: mode %v, want 0644", conf, fi.Mode().Perm())
	}
	if !strings.Contains(out, "node-mirror install") {
		t.Errorf("make install does not tell the operator to run node-mirror install:\n%s", out)
	}

	// Nothing else is installed.
	var files []string
	_ = filepath.Walk(dest, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			rel, _ := filepath.Rel(dest, p)
			files = append(files, rel)
		}
		return nil
	})
	if want := "etc/node-mirror/config.toml etc/systemd/system/node-mirror.service usr/bin/node-mirror"; strings.Join(files, " ") != want {
		t.Errorf("installed files %q, want %q", files, want)
	}

	// A second install keeps the operator's config and replaces the unit.
	edited := []byte("listen = \"127.0.0.1:5001\"\n")
	if err := os.WriteFile(conf, edited, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(unitPath, []byte("stale"), 0o644); err != nil {
		t.Fatal(err)
	}
	makeInstall(t, dest, "PREFIX=/usr")
	if got, _ := os.ReadFile(conf); !bytes.Equal(got, edited) {
		t.Errorf("make install overwrote an existing %s", conf)
	}
	if got, _ := os.ReadFile(unitPath); !bytes.Equal(got, unit) {
		t.Errorf("make install did not replace the unit")
	}
}

// The default PREFIX is /usr/local, which is what the unit in the repository names.
func TestMakeInstallDefaultPrefix(t *testing.T) {
	dest := t.TempDir()
	makeInstall(t, dest)
	if _, err := os.Stat(filepath.Join(dest, "usr/local/bin/node-mirror")); err != nil {
		t.Fatal(err)
	}
	unit, err := os.ReadFile(filepath.Join(dest, "etc/systemd/system/node-mirror.service"))
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile(filepath.Join(repoRoot(t), "systemd/node-mirror.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(unit, src) {
		t.Error("with the default PREFIX the installed unit differs from systemd/node-mirror.service")
	}
}

// Under DynamicUser=, systemd makes /var/lib/node-mirror a symlink to
// private/node-mirror, owned by the transient user the daemon runs as: the daemon can
// write there. `node-mirror install` keeps its record (hosts.StatePath) somewhere else,
// 0600 in a 0700 directory of root's, because the record decides what uninstall writes as
// root and holds copies of config files that can carry registry passwords. install
// leaves the service's symlink alone, and what the daemon writes in its state directory
// has no say in uninstall.
func TestInstallStateOutsideDynamicUserStateDir(t *testing.T) {
	const stateDir = "/var/lib/node-mirror" // StateDirectory=node-mirror
	for _, d := range []string{stateDir, "/var/lib/private/node-mirror"} {
		if strings.HasPrefix(hosts.StatePath, d+"/") {
			t.Fatalf("install state %s is inside the daemon's state directory %s", hosts.StatePath, d)
		}
	}
	root := t.TempDir()
	private := filepath.Join(root, "var/lib/private/node-mirror")
	if err := os.MkdirAll(private, 0o700); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		// As systemd leaves it: owned by the dynamic user (from its 61184-65519 range).
		if err := os.Chown(private, 61184, 61184); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("private/node-mirror", filepath.Join(root, stateDir)); err != nil {
		t.Fatal(err)
	}
	writeFile := func(p, s string, mode os.FileMode) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), mode); err != nil {
			t.Fatal(err)
		}
	}
	const passwd = "root:x:0:0:root:/root:/bin/bash\n"
	writeFile(filepath.Join(root, "etc/passwd"), passwd, 0o644)
	if err := os.MkdirAll(filepath.Join(root, "etc/containerd"), 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(nodeMirrorBin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("node-mirror %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	run("install", "--root", root, "--engines", "containerd", "--registries", "docker.io")

	state := filepath.Join(root, hosts.StatePath)
	for _, c := range []struct {
		path string
		mode os.FileMode
	}{{state, 0o600}, {filepath.Dir(state), 0o700}} {
		fi, err := os.Lstat(c.path)
		if err != nil {
			t.Fatalf("install's state: %v", err)
		}
		if fi.Mode().Perm() != c.mode {
			t.Errorf("%s: mode %v, want %v", c.path, fi.Mode().Perm(), c.mode)
		}
		if uid := fi.Sys().(*syscall.Stat_t).Uid; int(uid) != os.Geteuid() {
			t.Errorf("%s: owner %d, want %d", c.path, uid, os.Geteuid())
		}
	}
	// Resolved, the record is nowhere under the service's state directory.
	realState, err := filepath.EvalSymlinks(state)
	if err != nil {
		t.Fatal(err)
	}
	realPrivate, err := filepath.EvalSymlinks(private)
	if err != nil {
		t.Fatal(err)
	}
	if strings.HasPrefix(realState, realPrivate+"/") {
		t.Errorf("install's state %s is in the service's state directory %s", realState, realPrivate)
	}
	if ents, err := os.ReadDir(private); err != nil || len(ents) > 0 {
		t.Errorf("install wrote into the service's state directory: %v %v", ents, err)
	}
	if fi, err := os.Lstat(filepath.Join(root, stateDir)); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("install replaced the state directory's symlink: %v", err)
	}
	hostsTOML := filepath.Join(root, "etc/containerd/certs.d/docker.io/hosts.toml")
	if _, err := os.Stat(hostsTOML); err != nil {
		t.Fatal(err)
	}

	// A compromised daemon writes an install record where install used to keep it, one
	// that would "restore" /etc/passwd with a second uid 0.
	forged := fmt.Sprintf(`{"version": 1, "mirror_urls": ["http://127.0.0.1:5000"], "files": [{"path": "/etc/passwd",
		"engine": "containerd", "kind": "hosts.toml", "existed": true, "original": %q,
		"original_sha256": "", "installed_sha256": %q}]}`,
		base64.StdEncoding.EncodeToString([]byte(passwd+"toor::0:0::/root:/bin/sh\n")), fmt.Sprintf("%x", sha256.Sum256([]byte(passwd))))
	writeFile(filepath.Join(root, stateDir, "install-state.json"), forged, 0o600)

	out := run("uninstall", "--root", root)
	if _, err := os.Stat(hostsTOML); !os.IsNotExist(err) {
		t.Errorf("uninstall left %s: %v", hostsTOML, err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc/passwd")); string(b) != passwd {
		t.Errorf("uninstall rewrote /etc/passwd from the daemon's file:\n%s", b)
	}
	if !strings.Contains(out, "install-state.json") {
		t.Errorf("uninstall did not mention the leftover file in the daemon's directory:\n%s", out)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("uninstall left its state: %v", err)
	}

	// With no record of its own, the daemon's file alone is refused, not acted on.
	out2, err := exec.Command(nodeMirrorBin, "uninstall", "--root", root).CombinedOutput()
	if err == nil || !strings.Contains(string(out2), "not trusted") {
		t.Errorf("uninstall with only the daemon's record: %v\n%s", err, out2)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc/passwd")); string(b) != passwd {
		t.Errorf("uninstall rewrote /etc/passwd from the daemon's file:\n%s", b)
	}
}
