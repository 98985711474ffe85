package hosts

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/node-mirror/node-mirror/internal/regname"
)

// Each merger either refuses or produces a file that parses, has our entry first, is
// unchanged by a second merge, and loses only our entry on unmerge. Seeds are in
// testdata/fuzz/<target>.

func FuzzMergeHostsTOML(f *testing.F) {
	f.Add([]byte("server = \"https://ghcr.io\"\n\n[host.\"https://ghcr.io\"]\n  ca = \"ca.pem\"\n"), true)
	f.Fuzz(func(t *testing.T, in []byte, withServer bool) {
		h := hostsTOML{mirror: testMirror}
		if withServer {
			h.server = "https://registry-1.docker.io"
		}
		out, err := mergeHostsTOML("hosts.toml", in, h, []string{"http://127.0.0.1:5999"})
		if err != nil {
			return
		}
		d, err := parseTOML("hosts.toml", out)
		if err != nil {
			t.Fatalf("merged output does not parse: %v\n%s", err, out)
		}
		if order := hostOrder(d); len(order) == 0 || order[0] != testMirror {
			t.Fatalf("mirror not first: %v\n%s", order, out)
		}
		again, err := mergeHostsTOML("hosts.toml", out, h, nil)
		if err != nil || !bytes.Equal(again, out) {
			t.Fatalf("second merge changed the file (err %v):\n%s\n---\n%s", err, out, again)
		}
		orig, _ := parseTOML("hosts.toml", in)
		back, err := unmergeHostsTOML("hosts.toml", out, []string{testMirror}, map[bool]string{true: h.server}[withServer && isBlank(orig)])
		if err != nil {
			t.Fatalf("unmerge: %v", err)
		}
		want := stripHost(orig.data, []string{testMirror, "http://127.0.0.1:5999"})
		var got map[string]any
		if back != nil {
			bd, err := parseTOML("hosts.toml", back)
			if err != nil {
				t.Fatalf("unmerged output does not parse: %v\n%s", err, back)
			}
			got = stripHost(bd.data, nil) // an emptied [host] table is the user's header, kept
		}
		if len(want) == 0 && len(got) == 0 {
			return
		}
		if !reflect.DeepEqual(want, got) {
			t.Fatalf("unmerge(merge(x)) != x:\n%v\n%v", want, got)
		}
	})
}

func FuzzSetConfigPath(f *testing.F) {
	f.Add([]byte(debianConfig))
	for _, in := range []string{"containerd2-default", "containerd2-list", "containerd2-no-registry"} {
		b, err := os.ReadFile(filepath.Join("testdata/in", in, containerdConfigFile))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		d, c, err := readContainerdConfig("config.toml", in)
		if err != nil {
			return
		}
		dir, needsSet := c.hostsDir()
		if !needsSet {
			return
		}
		out, err := setConfigPath("config.toml", d, c, dir)
		if err != nil {
			return
		}
		_, nc, err := readContainerdConfig("config.toml", out)
		if err != nil {
			t.Fatalf("edited config does not parse: %v\n%s", err, out)
		}
		if nc.configPath != dir {
			t.Fatalf("config_path = %q, want %q\n%s", nc.configPath, dir, out)
		}
		back, err := revertConfigPath("config.toml", out, in, dir)
		if err != nil {
			t.Fatalf("revert: %v", err)
		}
		bd, err := parseTOML("config.toml", back)
		if err != nil {
			t.Fatalf("reverted config does not parse: %v\n%s", err, back)
		}
		if !reflect.DeepEqual(withoutKey(d.data, c.registry), withoutKey(bd.data, c.registry)) {
			t.Fatalf("revert changed other settings:\n%s\n---\n%s", in, back)
		}
		if v, _ := lookup(bd.data, append(c.registry, "config_path")...); v != nil && (!c.set || v != c.configPath) {
			t.Fatalf("revert left config_path = %v (was set=%v %q)", v, c.set, c.configPath)
		}
	})
}

func FuzzMergeDaemonJSON(f *testing.F) {
	f.Add([]byte("{\"debug\": true}\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		out, err := mergeDaemonJSON("daemon.json", in, testMirror, []string{"http://127.0.0.1:5999"})
		if err != nil {
			return
		}
		var m map[string]any
		if err := json.Unmarshal(out, &m); err != nil {
			t.Fatalf("merged daemon.json does not parse: %v\n%s", err, out)
		}
		list, _ := m[registryMirrorsKey].([]any)
		if len(list) == 0 || list[0] != testMirror {
			t.Fatalf("mirror not first: %v", m[registryMirrorsKey])
		}
		again, err := mergeDaemonJSON("daemon.json", out, testMirror, nil)
		if err != nil || !bytes.Equal(again, out) {
			t.Fatalf("second merge changed the file (err %v)", err)
		}
		back, err := unmergeDaemonJSON("daemon.json", out, []string{testMirror})
		if err != nil {
			t.Fatalf("unmerge: %v", err)
		}
		var orig, got map[string]any
		if len(bytes.TrimSpace(in)) > 0 {
			_ = json.Unmarshal(in, &orig)
		}
		if err := json.Unmarshal(back, &got); err != nil {
			t.Fatalf("unmerged daemon.json does not parse: %v", err)
		}
		if orig == nil {
			orig = map[string]any{}
		}
		if l, ok := orig[registryMirrorsKey].([]any); ok {
			orig[registryMirrorsKey] = slices.DeleteFunc(l, func(v any) bool { return v == testMirror || v == "http://127.0.0.1:5999" })
		} else {
			orig[registryMirrorsKey] = []any{}
		}
		if !reflect.DeepEqual(orig, got) {
			t.Fatalf("unmerge(merge(x)) != x:\n%v\n%v", orig, got)
		}
	})
}

// FuzzDropIn feeds an arbitrary registries.conf.d file in as another file's entries: our
// drop-in must parse and give every registry our mirror first, and unmerging it must
// leave only what was carried over.
func FuzzDropIn(f *testing.F) {
	f.Add([]byte("[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n[[registry.mirror]]\nlocation = \"corp.example\"\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		var c containersConfFile
		if _, err := parseTOML("x.conf", in); err != nil {
			return
		}
		if err := toml.Unmarshal(in, &c); err != nil {
			return
		}
		st := containersState{before: map[string]carried{}}
		for _, r := range c.Registries {
			st.before[r.prefix()] = carried{reg: r, file: "/etc/containers/registries.conf.d/10-x.conf"}
		}
		regs := []string{"docker.io", "quay.io"}
		out := renderDropIn(testMirror, regs, st)
		var got containersConfFile
		if err := toml.Unmarshal(out, &got); err != nil {
			t.Fatalf("drop-in does not parse: %v\n%s", err, out)
		}
		if len(got.Registries) != len(regs) {
			t.Fatalf("drop-in has %d registries, want %d", len(got.Registries), len(regs))
		}
		for i, r := range got.Registries {
			want, _ := containersMirrorLocation(testMirror, regs[i])
			if r.Prefix != regs[i] || len(r.Mirrors) == 0 || r.Mirrors[0].Location != want {
				t.Fatalf("registry %d: %+v", i, r)
			}
		}
		if _, err := unmergeDropIn("drop-in", out, []string{testMirror}); err != nil {
			t.Fatalf("unmerge: %v", err)
		}
	})
}

// FuzzRegistryName: a name validRegistry accepts is one directory directly inside the
// hosts directory, whatever bytes it was made of.
func FuzzRegistryName(f *testing.F) {
	for _, s := range []string{"docker.io", "localhost:5001", "[::1]:5000", "..", "a/../b", "Docker.io", "127.0.0.1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if regname.Check(name) != nil {
			return
		}
		const dir = "/etc/containerd/certs.d"
		p := filepath.Join(dir, name, "hosts.toml")
		if filepath.Dir(filepath.Dir(p)) != dir || registryOfHostsPath(p) != name {
			t.Fatalf("registry %q makes %s, outside %s", name, p, dir)
		}
		if strings.ToLower(name) != name || len(name) > regname.MaxLen || strings.ContainsAny(name, "/\\\x00 \t\n\"'") {
			t.Fatalf("registry %q accepted", name)
		}
	})
}
