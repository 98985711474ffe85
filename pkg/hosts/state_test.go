package hosts

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

const passwd = "root:x:0:0:root:/root:/bin/bash\n"

// legacyState is where node-mirror kept install state before: the service's
// StateDirectory, which the daemon itself can write.
const legacyState = "/var/lib/node-mirror/install-state.json"

// installed is a root with containerd and Docker configured through the mirror and an
// /etc/passwd to attack.
func installed(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	writeFiles(t, root, map[string]string{
		containerdConfigFile: debianConfig,
		dockerDaemonJSON:     "{\"debug\": true}\n",
		"/etc/passwd":        passwd,
	})
	if err := os.MkdirAll(filepath.Join(root, "etc/ssh"), 0o755); err != nil {
		t.Fatal(err)
	}
	install(t, Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: []string{Containerd, Docker}})
	return root
}

func readState(t *testing.T, root string) installState {
	t.Helper()
	var st installState
	if err := json.Unmarshal([]byte(read(t, root, StatePath)), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// writeState replaces the state file's content in place, keeping its mode and owner.
func writeState(t *testing.T, root string, st installState) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(root, StatePath), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(st.encode()); err != nil {
		t.Fatal(err)
	}
}

// evilRecord makes uninstall (or a reinstall reverting it) "restore" path to a passwd with
// a second uid 0, as a compromised daemon would write it.
func evilRecord(t *testing.T, root, path, engine, kind string) fileRecord {
	t.Helper()
	cur, _ := os.ReadFile(filepath.Join(root, path))
	return fileRecord{
		Path: path, Engine: engine, Kind: kind, Existed: true,
		Original:        []byte(passwd + "toor::0:0::/root:/bin/sh\n"),
		OriginalSHA256:  sum([]byte("x")),
		InstalledSHA256: sum(cur),
	}
}

// A state file is trusted only if only root (or, not running as root, the invoking user)
// could have written it, and then only for the files install writes. Whatever it says
// otherwise, install and uninstall refuse it and change nothing: not /etc/passwd, not
// the engine files.
func TestUntrustedStateRefused(t *testing.T) {
	otherUID := 4321
	for _, tc := range []struct {
		name  string
		craft func(t *testing.T, root string)
		want  []string // in the error
	}{
		{
			name: "record for /etc/passwd",
			craft: func(t *testing.T, root string) {
				st := readState(t, root)
				st.Files = append(st.Files, evilRecord(t, root, "/etc/passwd", Containerd, kindHostsTOML))
				writeState(t, root, st)
			},
			want: []string{"/etc/passwd", "not a file install writes"},
		},
		{
			name: "hosts.toml record climbing out of certs.d",
			craft: func(t *testing.T, root string) {
				st := readState(t, root)
				st.Files = append(st.Files, evilRecord(t, root, "/etc/containerd/certs.d/../../passwd", Containerd, kindHostsTOML))
				writeState(t, root, st)
			},
			want: []string{"certs.d/../../passwd"},
		},
		{
			name: "hosts.toml record with another name",
			craft: func(t *testing.T, root string) {
				writeFiles(t, root, map[string]string{"/etc/containerd/certs.d/x/passwd": passwd})
				st := readState(t, root)
				st.Files = append(st.Files, evilRecord(t, root, "/etc/containerd/certs.d/x/passwd", Containerd, kindHostsTOML))
				writeState(t, root, st)
			},
			want: []string{"/etc/containerd/certs.d/x/passwd"},
		},
		{
			name: "hosts.toml record outside the hosts directories",
			craft: func(t *testing.T, root string) {
				writeFiles(t, root, map[string]string{"/etc/x/hosts.toml": passwd})
				st := readState(t, root)
				st.Files = append(st.Files, evilRecord(t, root, "/etc/x/hosts.toml", Containerd, kindHostsTOML))
				writeState(t, root, st)
			},
			want: []string{"/etc/x/hosts.toml"},
		},
		{
			name: "known path under the wrong kind",
			craft: func(t *testing.T, root string) {
				st := readState(t, root)
				for i := range st.Files {
					if st.Files[i].Path == dockerDaemonJSON {
						st.Files[i].Kind = kindContainerdConf
					}
				}
				writeState(t, root, st)
			},
			want: []string{dockerDaemonJSON},
		},
		{
			name: "relative path",
			craft: func(t *testing.T, root string) {
				st := readState(t, root)
				st.Files = append(st.Files, evilRecord(t, root, "etc/passwd", Containerd, kindHostsTOML))
				writeState(t, root, st)
			},
			want: []string{`"etc/passwd"`},
		},
		{
			name: "created directory install never makes",
			craft: func(t *testing.T, root string) {
				st := readState(t, root)
				st.CreatedDirs = append(st.CreatedDirs, "/etc/ssh")
				writeState(t, root, st)
			},
			want: []string{"/etc/ssh"},
		},
		{
			name: "mirror URL that is not one",
			craft: func(t *testing.T, root string) {
				st := readState(t, root)
				st.MirrorURLs = append(st.MirrorURLs, "file:///etc/passwd")
				writeState(t, root, st)
			},
			want: []string{"file:///etc/passwd"},
		},
		{
			name: "state file readable by others",
			craft: func(t *testing.T, root string) {
				chmod(t, filepath.Join(root, StatePath), 0o644)
			},
			want: []string{"mode 0644", "0600"},
		},
		{
			name: "state file writable by the group",
			craft: func(t *testing.T, root string) {
				chmod(t, filepath.Join(root, StatePath), 0o620)
			},
			want: []string{"mode 0620"},
		},
		{
			name: "crafted and world-writable",
			craft: func(t *testing.T, root string) {
				st := readState(t, root)
				st.Files = append(st.Files, evilRecord(t, root, "/etc/passwd", Containerd, kindHostsTOML))
				writeState(t, root, st)
				chmod(t, filepath.Join(root, StatePath), 0o666)
			},
			want: []string{"mode 0666"},
		},
		{
			name: "state directory writable by others",
			craft: func(t *testing.T, root string) {
				chmod(t, filepath.Join(root, filepath.Dir(StatePath)), 0o777)
			},
			want: []string{filepath.Dir(StatePath), "mode 0777"},
		},
		{
			name: "a parent directory writable by the group",
			craft: func(t *testing.T, root string) {
				chmod(t, filepath.Join(root, "var/lib"), 0o775)
			},
			want: []string{"/var/lib", "mode 0775"},
		},
		{
			name: "state file owned by someone else",
			craft: func(t *testing.T, root string) {
				st := readState(t, root)
				st.Files = append(st.Files, evilRecord(t, root, "/etc/passwd", Containerd, kindHostsTOML))
				writeState(t, root, st)
				foreign(t, filepath.Join(root, StatePath), otherUID)
			},
			want: []string{"owned by uid", "not root"},
		},
		{
			name: "state directory owned by someone else",
			craft: func(t *testing.T, root string) {
				foreign(t, filepath.Join(root, filepath.Dir(StatePath)), otherUID)
			},
			want: []string{filepath.Dir(StatePath), "owned by uid"},
		},
		{
			name: "state file is a symlink",
			craft: func(t *testing.T, root string) {
				p := filepath.Join(root, StatePath)
				if err := os.Rename(p, filepath.Join(root, "etc/state.json")); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(filepath.Join(root, "etc/state.json"), p); err != nil {
					t.Fatal(err)
				}
			},
			want: []string{"symlink"},
		},
		{
			name: "state directory is a symlink",
			craft: func(t *testing.T, root string) {
				d := filepath.Join(root, filepath.Dir(StatePath))
				if err := os.Rename(d, filepath.Join(root, "etc/state")); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(filepath.Join(root, "etc/state"), d); err != nil {
					t.Fatal(err)
				}
			},
			want: []string{"symlink"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for what, plan := range map[string]func(root string) (*Plan, error){
				"uninstall": Uninstall,
				"install": func(root string) (*Plan, error) {
					return Install(Options{Root: root, MirrorURL: "http://127.0.0.1:5999", Registries: []string{"ghcr.io"}, Engines: Engines})
				},
			} {
				root := installed(t)
				tc.craft(t, root)
				before := snapshot(t, root)
				p, err := plan(root)
				if err == nil {
					t.Errorf("%s accepted the state file", what)
					// Go on as the operator would, to show what the state file made it do.
					if err := p.Apply(); err != nil {
						t.Logf("%s: apply: %v", what, err)
					}
				} else {
					for _, w := range append(tc.want, filepath.Join(root, StatePath)) {
						if !strings.Contains(err.Error(), w) {
							t.Errorf("%s: error %q does not mention %q", what, err, w)
						}
					}
				}
				if got := read(t, root, "/etc/passwd"); got != passwd {
					t.Errorf("%s rewrote /etc/passwd:\n%s", what, got)
				}
				if err == nil {
					continue
				}
				if d := diffTrees(before, snapshot(t, root)); len(d) > 0 {
					t.Errorf("%s: a refused state file still changed %v", what, d)
				}
			}
		})
	}
}

func chmod(t *testing.T, path string, mode os.FileMode) {
	t.Helper()
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// foreign gives path to another user: for real as root; otherwise by having the check
// believe it runs as someone else, so path's real owner (this user) is the foreign one.
func foreign(t *testing.T, path string, uid int) {
	t.Helper()
	if os.Geteuid() == 0 {
		if err := os.Lchown(path, uid, uid); err != nil {
			t.Fatal(err)
		}
		return
	}
	old := euid
	t.Cleanup(func() { euid = old })
	me := os.Geteuid()
	euid = func() int { return me + 1 }
}

// Not running as root, the invoking user's own state is trusted (tests and --root
// scratch trees); a root-owned one too, since root can write anything anyway.
func TestStateOwnedByInvokingUser(t *testing.T) {
	root := installed(t)
	old := euid
	defer func() { euid = old }()
	owner := os.Geteuid()
	euid = func() int { return owner }
	if _, err := Uninstall(root); err != nil {
		t.Fatalf("own state refused: %v", err)
	}
	if owner == 0 {
		// Root's state, checked by a process running as some other user.
		euid = func() int { return 4321 }
		if _, err := Uninstall(root); err != nil {
			t.Fatalf("root's state refused: %v", err)
		}
	}
}

// install keeps its state in a directory of its own, 0700, not in the daemon's
// StateDirectory (/var/lib/node-mirror, which the daemon's user owns); the file is 0600
// and owned by whoever ran install.
func TestStateFileLocationAndMode(t *testing.T) {
	if strings.HasPrefix(StatePath, "/var/lib/node-mirror/") || filepath.Dir(StatePath) == "/var/lib/node-mirror" {
		t.Fatalf("StatePath %s is in the daemon's state directory", StatePath)
	}
	root := installed(t)
	for _, c := range []struct {
		path string
		mode os.FileMode
	}{{StatePath, 0o600}, {filepath.Dir(StatePath), 0o700}} {
		fi, err := os.Lstat(filepath.Join(root, c.path))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != c.mode || fi.Mode()&os.ModeSymlink != 0 {
			t.Errorf("%s: mode %v, want %v", c.path, fi.Mode(), c.mode)
		}
		if uid := int(fi.Sys().(*syscall.Stat_t).Uid); uid != os.Geteuid() {
			t.Errorf("%s: owner %d, want %d", c.path, uid, os.Geteuid())
		}
	}
	// Even when the state file exists with a narrower mode or the umask is wide, a
	// rewrite leaves it 0600.
	chmod(t, filepath.Join(root, StatePath), 0o400)
	install(t, Options{Root: root, MirrorURL: "http://127.0.0.1:5999", Registries: []string{"docker.io"}, Engines: []string{Containerd, Docker}})
	if fi, err := os.Stat(filepath.Join(root, StatePath)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("rewritten state file: %v %v, want mode 0600", fi, err)
	}
	uninstall(t, root)
	if _, err := os.Stat(filepath.Join(root, filepath.Dir(StatePath))); !os.IsNotExist(err) {
		t.Errorf("uninstall left the state directory it created: %v", err)
	}
}

// State from an earlier node-mirror, in the daemon's state directory, is not trusted:
// install and uninstall refuse and say what to do, and change nothing.
func TestLegacyStateRefused(t *testing.T) {
	root := installed(t)
	legacy := filepath.Join(root, legacyState)
	if err := os.MkdirAll(filepath.Dir(legacy), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(root, StatePath), legacy); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, root)
	_, uerr := Uninstall(root)
	_, ierr := Install(Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: []string{Containerd, Docker}})
	for what, err := range map[string]error{"uninstall": uerr, "install": ierr} {
		if err == nil {
			t.Errorf("%s trusted %s", what, legacyState)
			continue
		}
		for _, w := range []string{legacy, filepath.Join(root, StatePath), "daemon can write"} {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not mention %q", what, err, w)
			}
		}
	}
	if d := diffTrees(before, snapshot(t, root)); len(d) > 0 {
		t.Errorf("a refused legacy state changed %v", d)
	}

	// Moved where it belongs, as the error says, it is used; a copy left behind is named.
	if err := os.MkdirAll(filepath.Join(root, filepath.Dir(StatePath)), 0o700); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(legacy)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, StatePath), b, 0o600); err != nil {
		t.Fatal(err)
	}
	p := uninstall(t, root)
	if !strings.Contains(strings.Join(p.Notes(), "\n"), legacy) {
		t.Errorf("notes %q do not mention the leftover %s", p.Notes(), legacy)
	}
	if got := read(t, root, containerdConfigFile); got != debianConfig {
		t.Errorf("config.toml not restored:\n%s", got)
	}
}

// hosts.toml files under a config_path of the operator's own are files install writes.
func TestCustomConfigPathRoundTrip(t *testing.T) {
	root := t.TempDir()
	conf := "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/registry.d:/etc/docker/certs.d\"\n"
	writeFiles(t, root, map[string]string{containerdConfigFile: conf})
	before := snapshot(t, root)
	install(t, Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io", "localhost:5001"}, Engines: []string{Containerd}})
	if _, err := os.Stat(filepath.Join(root, "/etc/containerd/registry.d/localhost:5001/hosts.toml")); err != nil {
		t.Fatal(err)
	}
	uninstall(t, root)
	if d := diffTrees(before, snapshot(t, root)); len(d) > 0 {
		t.Errorf("uninstall left %v", d)
	}
}

// A config_path that is not absolute is no directory install can find.
func TestRelativeConfigPathRefused(t *testing.T) {
	root := t.TempDir()
	writeFiles(t, root, map[string]string{containerdConfigFile: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"../../certs\"\n"})
	_, err := Install(Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: []string{Containerd}})
	if err == nil || !strings.Contains(err.Error(), "../../certs") {
		t.Fatalf("err = %v, want the relative config_path refused", err)
	}
}
