package hosts

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// writeFiles puts host-path → content files below root.
func writeFiles(t *testing.T, root string, files map[string]string) {
	t.Helper()
	for p, s := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

const dockerHostsFile = "/etc/docker/certs.d/docker.io/hosts.toml"
const containerdHostsFile = "/etc/containerd/certs.d/docker.io/hosts.toml"

// A broken or refused file stops the whole run: the error names file and line, and not a
// single file (nor the state record) is written, including the engines that were fine.
func TestInstallRefuses(t *testing.T) {
	good := map[string]string{
		dockerDaemonJSON: `{"debug": true}` + "\n",
		"/etc/containers/registries.conf.d/00-ok.conf": "",
	}
	for _, tc := range []struct {
		name  string
		files map[string]string
		want  []string // substrings of the error
	}{
		{
			name:  "config.toml syntax",
			files: map[string]string{containerdConfigFile: "version = 2\n\n[plugins\n"},
			want:  []string{"etc/containerd/config.toml:3:"},
		},
		{
			name:  "config.toml duplicate key",
			files: map[string]string{containerdConfigFile: "version = 2\nroot = \"/a\"\nroot = \"/b\"\n"},
			want:  []string{"etc/containerd/config.toml:3:"},
		},
		{
			name: "deprecated mirrors",
			files: map[string]string{containerdConfigFile: `version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = ""
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
    endpoint = ["https://mirror.gcr.io"]
`},
			want: []string{"etc/containerd/config.toml:4:", "registry.mirrors is set", "hosts.toml"},
		},
		{
			name: "deprecated tls config",
			files: map[string]string{containerdConfigFile: `version = 2
[plugins."io.containerd.grpc.v1.cri".registry.configs."corp.example".tls]
  insecure_skip_verify = true
`},
			want: []string{"etc/containerd/config.toml:2:", `configs."corp.example".tls is set`},
		},
		{
			name:  "unknown config version",
			files: map[string]string{containerdConfigFile: "version = 9\n"},
			want:  []string{"config version 9"},
		},
		{
			name:  "hosts.toml syntax",
			files: map[string]string{containerdHostsFile: "server = \"https://registry-1.docker.io\"\n[host.\"x\"\n"},
			want:  []string{"certs.d/docker.io/hosts.toml:2:"},
		},
		{
			name:  "daemon.json syntax",
			files: map[string]string{dockerDaemonJSON: "{\n  \"debug\": true,\n  \"log-level\": \"warn\"\n  \"bip\": \"10.0.0.1/24\"\n}\n"},
			want:  []string{"etc/docker/daemon.json:4:"},
		},
		{
			name:  "daemon.json duplicate key",
			files: map[string]string{dockerDaemonJSON: "{\n  \"debug\": true,\n  \"debug\": false\n}\n"},
			want:  []string{"etc/docker/daemon.json:3:", "already set on line 2"},
		},
		{
			name:  "daemon.json not an object",
			files: map[string]string{dockerDaemonJSON: "[1, 2]\n"},
			want:  []string{"etc/docker/daemon.json:1:", "want a JSON object"},
		},
		{
			name:  "daemon.json mirrors not a list",
			files: map[string]string{dockerDaemonJSON: "{\n  \"registry-mirrors\": \"http://x\"\n}\n"},
			want:  []string{"etc/docker/daemon.json:2:", "list of URLs"},
		},
		{
			name:  "registries.conf.d syntax",
			files: map[string]string{"/etc/containers/registries.conf.d/10-bad.conf": "[[registry]]\nprefix = \"docker.io\"\nlocation = \n"},
			want:  []string{"registries.conf.d/10-bad.conf:3:"},
		},
		{
			name: "every broken file at once",
			files: map[string]string{
				containerdConfigFile: "version = 2\n[plugins\n",
				dockerDaemonJSON:     "{\"debug\": }\n",
			},
			want: []string{"config.toml:2:", "daemon.json:1:"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			writeFiles(t, root, good)
			writeFiles(t, root, tc.files)
			before := snapshot(t, root)
			_, err := Install(Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: Engines})
			if err == nil {
				t.Fatal("install succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if !strings.Contains(err.Error(), "nothing was changed") && !strings.Contains(err.Error(), "config version") {
				t.Errorf("error %q does not say nothing was changed", err)
			}
			if d := diffTrees(before, snapshot(t, root)); len(d) > 0 {
				t.Errorf("a refused install wrote %v", d)
			}
		})
	}
}

func TestInstallRejectsBadOptions(t *testing.T) {
	root := t.TempDir()
	for _, o := range []Options{
		{MirrorURL: "127.0.0.1:5000", Registries: []string{"docker.io"}},
		{MirrorURL: "ftp://127.0.0.1", Registries: []string{"docker.io"}},
		{MirrorURL: testMirror, Registries: []string{"docker.io/library"}},
		{MirrorURL: testMirror, Registries: []string{"*", "docker.io"}},
		{MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: []string{"rkt"}},
	} {
		o.Root = root
		if _, err := Install(o); err == nil {
			t.Errorf("%+v: accepted", o)
		}
	}
	if _, err := Install(Options{Root: filepath.Join(root, "nope"), MirrorURL: testMirror, Registries: []string{"docker.io"}}); err == nil {
		t.Error("missing root accepted")
	}
}

// A symlinked config is refused rather than replaced by a copy.
func TestInstallRefusesSymlink(t *testing.T) {
	root := t.TempDir()
	writeFiles(t, root, map[string]string{"/managed/daemon.json": "{}\n"})
	if err := os.MkdirAll(filepath.Join(root, "etc/docker"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/managed/daemon.json", filepath.Join(root, dockerDaemonJSON)); err != nil {
		t.Fatal(err)
	}
	_, err := Install(Options{Root: root, MirrorURL: testMirror, Registries: []string{"docker.io"}, Engines: []string{Docker}})
	if err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Fatalf("err = %v, want a symlink refusal", err)
	}
}
