package hosts

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

const (
	containersConf      = "/etc/containers/registries.conf"
	containersDropInDir = "/etc/containers/registries.conf.d"
	// Drop-ins are read in name order and a later [[registry]] with the same prefix replaces
	// an earlier one; 90 puts ours after the usual ones, whose settings we carry over.
	containersDropInName = "90-node-mirror.conf"
)

// containersRegistry is one [[registry]] of containers-registries.conf(5), the fields we
// carry over when our drop-in replaces an entry another file made.
type containersRegistry struct {
	Prefix             string             `toml:"prefix,omitempty"`
	Location           string             `toml:"location,omitempty"`
	Insecure           bool               `toml:"insecure,omitempty"`
	Blocked            bool               `toml:"blocked,omitempty"`
	MirrorByDigestOnly bool               `toml:"mirror-by-digest-only,omitempty"`
	Mirrors            []containersMirror `toml:"mirror,omitempty"`
}

type containersMirror struct {
	Location       string `toml:"location"`
	Insecure       bool   `toml:"insecure,omitempty"`
	PullFromMirror string `toml:"pull-from-mirror,omitempty"`
}

type containersConfFile struct {
	Registries []containersRegistry `toml:"registry"`
}

func (r containersRegistry) prefix() string {
	if r.Prefix != "" {
		return r.Prefix
	}
	return r.Location
}

// carried is an entry another file made for a registry we mirror.
type carried struct {
	reg  containersRegistry
	file string
}

// containersState is what the other registries.conf files already say.
type containersState struct {
	before map[string]carried // replaced by our drop-in, so carried over into it
	after  map[string]string  // read after ours, so they win: prefix -> file
}

// readContainersConfs reads registries.conf and every drop-in but ours, in the order
// containers/image reads them.
func readContainersConfs(root string) (containersState, error) {
	st := containersState{before: map[string]carried{}, after: map[string]string{}}
	files := []string{containersConf}
	ents, err := os.ReadDir(filepath.Join(root, containersDropInDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return st, fmt.Errorf("reading %s: %w", filepath.Join(root, containersDropInDir), err)
	}
	var names []string
	for _, e := range ents {
		if !e.IsDir() && strings.HasSuffix(e.Name(), ".conf") && e.Name() != containersDropInName {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	for _, n := range names {
		files = append(files, filepath.Join(containersDropInDir, n))
	}
	for _, f := range files {
		b, ok, _, err := readFile(filepath.Join(root, f))
		if err != nil {
			return st, err
		}
		if !ok {
			continue
		}
		var c containersConfFile
		if _, err := parseTOML(filepath.Join(root, f), b); err != nil {
			return st, err
		}
		if err := toml.Unmarshal(b, &c); err != nil {
			return st, tomlError(filepath.Join(root, f), err)
		}
		later := filepath.Dir(f) == containersDropInDir && filepath.Base(f) > containersDropInName
		for _, r := range c.Registries {
			if later {
				st.after[r.prefix()] = f
			} else {
				st.before[r.prefix()] = carried{reg: r, file: f}
			}
		}
	}
	return st, nil
}

// containersMirrorLocation is the mirror as containers/image names it: host, the mirror
// URL's path, and the registry as a path element, which is how node-mirror routes clients
// that cannot send ?ns=.
func containersMirrorLocation(mirrorURL, registry string) (loc string, insecure bool) {
	rest := strings.TrimPrefix(strings.TrimPrefix(mirrorURL, "http://"), "https://")
	return strings.TrimSuffix(rest, "/") + "/" + registry, strings.HasPrefix(mirrorURL, "http://")
}

const dropInHeader = `# Written by ` + "`node-mirror install`; `node-mirror uninstall`" + ` removes it.
# Podman, CRI-O, Buildah and skopeo pull through the node-local mirror first and fall back
# to the registry itself. The mirror location carries the registry as a path element,
# which is how node-mirror knows the registry for clients that cannot send ?ns=.
`

// renderDropIn writes our registries.conf.d drop-in. An entry another file made for the
// same prefix is carried over whole, with our mirror first, since ours replaces it.
func renderDropIn(mirrorURL string, registries []string, st containersState) []byte {
	var b bytes.Buffer
	b.WriteString(dropInHeader)
	for _, name := range registries {
		loc, insecure := containersMirrorLocation(mirrorURL, name)
		reg := containersRegistry{Prefix: name, Location: name}
		c, ok := st.before[name]
		if ok {
			reg = c.reg
			reg.Prefix = name
			if reg.Location == "" {
				reg.Location = name
			}
		}
		b.WriteString("\n")
		if ok {
			fmt.Fprintf(&b, "# Carries over the settings for %s from %s, which this file replaces.\n", name, c.file)
		}
		b.WriteString("[[registry]]\n")
		fmt.Fprintf(&b, "prefix = %s\nlocation = %s\n", tomlString(reg.Prefix), tomlString(reg.Location))
		writeBool(&b, "insecure", reg.Insecure)
		writeBool(&b, "blocked", reg.Blocked)
		writeBool(&b, "mirror-by-digest-only", reg.MirrorByDigestOnly)
		mirrors := []containersMirror{{Location: loc, Insecure: insecure}}
		for _, m := range reg.Mirrors {
			if m.Location != loc {
				mirrors = append(mirrors, m)
			}
		}
		for _, m := range mirrors {
			fmt.Fprintf(&b, "\n[[registry.mirror]]\nlocation = %s\n", tomlString(m.Location))
			writeBool(&b, "insecure", m.Insecure)
			if m.PullFromMirror != "" {
				fmt.Fprintf(&b, "pull-from-mirror = %s\n", tomlString(m.PullFromMirror))
			}
		}
	}
	return b.Bytes()
}

func writeBool(b *bytes.Buffer, key string, v bool) {
	if v {
		fmt.Fprintf(b, "%s = true\n", key)
	}
}

// unmergeDropIn removes our mirrors from our drop-in after someone edited it, keeping what
// they added. It returns nil when nothing of theirs is left, meaning the file should go.
func unmergeDropIn(file string, cur []byte, mirrorURLs []string) ([]byte, error) {
	if _, err := parseTOML(file, cur); err != nil {
		return nil, err
	}
	var c containersConfFile
	if err := toml.Unmarshal(cur, &c); err != nil {
		return nil, tomlError(file, err)
	}
	var keep []containersRegistry
	for _, r := range c.Registries {
		var ours []string
		for _, u := range mirrorURLs {
			loc, _ := containersMirrorLocation(u, r.prefix())
			ours = append(ours, loc)
		}
		r.Mirrors = slices.DeleteFunc(r.Mirrors, func(m containersMirror) bool { return slices.Contains(ours, m.Location) })
		if len(r.Mirrors) > 0 || r.Insecure || r.Blocked || r.MirrorByDigestOnly || r.Location != r.prefix() {
			keep = append(keep, r)
		}
	}
	if len(keep) == 0 {
		return nil, nil
	}
	out, err := toml.Marshal(containersConfFile{Registries: keep})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return append([]byte("# What was left of node-mirror's drop-in after `node-mirror uninstall`.\n"), out...), nil
}
