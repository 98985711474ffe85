package hosts

import (
	"fmt"
	"path/filepath"
	"reflect"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"
)

// defaultContainerdHostsDir is where node-mirror points config_path when it has to set it.
const defaultContainerdHostsDir = "/etc/containerd/certs.d"

// containerdConfig is what install needs to know about /etc/containerd/config.toml.
type containerdConfig struct {
	version int64
	// registry is the path of the CRI registry table for this config version.
	registry []string
	// configPath is config_path's value; set tells whether the key is there at all.
	configPath string
	set        bool
}

// registryTable is where the CRI plugin's registry settings live in each config version.
func registryTable(version int64) ([]string, error) {
	switch version {
	case 1:
		return []string{"plugins", "cri", "registry"}, nil
	case 2:
		return []string{"plugins", "io.containerd.grpc.v1.cri", "registry"}, nil
	case 3, 4: // containerd 2.0 and 2.4 defaults; 4 changed nothing about the registry
		return []string{"plugins", "io.containerd.cri.v1.images", "registry"}, nil
	}
	return nil, fmt.Errorf("config version %d is not one node-mirror knows (1 to 4)", version)
}

// readContainerdConfig parses config.toml and refuses the deprecated registry settings
// that containerd rejects together with config_path.
func readContainerdConfig(file string, b []byte) (*tomlDoc, containerdConfig, error) {
	d, err := parseTOML(file, b)
	if err != nil {
		return nil, containerdConfig{}, err
	}
	c := containerdConfig{version: 1}
	if v, ok := d.data["version"]; ok {
		n, ok := v.(int64)
		if !ok {
			return nil, c, fmt.Errorf("%s:%d: version is not an integer", file, d.line("version"))
		}
		c.version = n
	}
	if c.registry, err = registryTable(c.version); err != nil {
		return nil, c, fmt.Errorf("%s: %w", file, err)
	}
	reg, _ := lookup(d.data, c.registry...)
	regTable, _ := reg.(map[string]any)
	if m, ok := regTable["mirrors"].(map[string]any); ok && len(m) > 0 {
		return nil, c, fmt.Errorf("%s:%d: %s.mirrors is set; containerd refuses it together with config_path, "+
			"which node-mirror needs. Move each mirror to <hosts dir>/<registry>/hosts.toml "+
			"(https://github.com/containerd/containerd/blob/main/docs/hosts.md), delete the mirrors table, and run install again",
			file, d.line(append(c.registry, "mirrors")...), dotted(c.registry))
	}
	if m, ok := regTable["configs"].(map[string]any); ok {
		for host, v := range m {
			if t, ok := v.(map[string]any); ok && t["tls"] != nil {
				return nil, c, fmt.Errorf("%s:%d: %s.configs.%q.tls is set; containerd refuses it together with config_path, "+
					"which node-mirror needs. Move the TLS settings to <hosts dir>/%s/hosts.toml (ca, client, skip_verify) and run install again",
					file, d.line(append(c.registry, "configs", host, "tls")...), dotted(c.registry), host, host)
			}
		}
	}
	if v, ok := regTable["config_path"]; ok {
		s, ok := v.(string)
		if !ok {
			return nil, c, fmt.Errorf("%s:%d: config_path is not a string", file, d.line(append(c.registry, "config_path")...))
		}
		c.configPath, c.set = s, true
	}
	return d, c, nil
}

// hostsDir is the directory install writes hosts.toml files into, and whether config.toml
// has to be changed so that containerd's CRI reads it.
//
// Only a config_path of one directory is read by every containerd. An empty or missing one
// makes 1.x's CRI read no directory at all, and 2.x's CRI default it to the list
// "/etc/containerd/certs.d:/etc/docker/certs.d"; every CRI pull in 2.x (unless
// use_local_image_pull) goes through the transfer service, which takes a list for one
// directory by that name, finds no hosts.toml and goes to the registry directly
// (containerd#12808, #12415). A list written in config.toml fails in 2.x the same way,
// whatever config version the file has, since 2.x migrates the older ones. So an empty
// value or a list is replaced by one directory: the list's first, where containerd would
// have looked first.
func (c containerdConfig) hostsDir() (dir string, needsSet bool) {
	switch dirs := filepath.SplitList(c.configPath); len(dirs) {
	case 0:
		return defaultContainerdHostsDir, true
	case 1:
		return dirs[0], false
	default:
		return dirs[0], true
	}
}

// isList tells whether config_path names more than one directory.
func (c containerdConfig) isList() bool { return len(filepath.SplitList(c.configPath)) > 1 }

// setConfigPath writes config_path = dir into the registry table, editing the text so the
// rest of the file (comments, layout, other settings) is left byte for byte.
func setConfigPath(file string, d *tomlDoc, c containerdConfig, dir string) ([]byte, error) {
	b := d.src
	key := append(append([]string{}, c.registry...), "config_path")
	switch i, t := d.find(unstable.KeyValue, key...), d.find(unstable.Table, c.registry...); {
	case i >= 0:
		e := d.exprs[i]
		b = splice(b, e.valStart, e.valEnd, tomlStringLike(b[e.valStart:e.valEnd], dir))
	case t >= 0:
		e := d.exprs[t]
		indent := indentOf(b, e.start) + "  "
		if t+1 < len(d.exprs) && d.exprs[t+1].kind == unstable.KeyValue {
			indent = indentOf(b, d.exprs[t+1].start)
		}
		b = splice(b, e.end, e.end, ensureNewline(b, e.end)+indent+"config_path = "+tomlString(dir)+"\n")
	default:
		// No registry table: add one after the last line of the plugin's own tables, indented
		// like its sub-tables (containerd's own default config indents by depth), or at the end.
		plugin := c.registry[:len(c.registry)-1]
		at, indent, found := len(b), "", false
		for _, e := range d.exprs {
			if !hasPrefix(e.path, plugin) {
				continue
			}
			at, found = e.end, true
			if e.kind == unstable.Table {
				indent = indentOf(b, e.start)
				if equalPath(e.path, plugin) && indent != "" {
					indent += "  "
				}
			}
		}
		text := indent + "[" + dotted(c.registry) + "]\n" + indent + "  config_path = " + tomlString(dir) + "\n"
		if !found {
			at = len(b)
			if len(b) > 0 {
				text = "\n" + text
			}
		}
		b = splice(b, at, at, ensureNewline(b, at)+text)
	}
	if err := verifyConfigPath(file, d, b, c, dir); err != nil {
		return nil, err
	}
	return b, nil
}

// verifyConfigPath re-parses the edited config: config_path must be dir and everything
// else exactly as before.
func verifyConfigPath(file string, before *tomlDoc, after []byte, c containerdConfig, dir string) error {
	d, err := parseTOML(file, after)
	if err != nil {
		return fmt.Errorf("%s: cannot add config_path to this layout (%v); set %s.config_path = %q by hand", file, err, dotted(c.registry), dir)
	}
	got, _ := lookup(d.data, append(c.registry, "config_path")...)
	if got != dir && dir != "" || dir == "" && got != nil && got != "" {
		return fmt.Errorf("%s: cannot add config_path to this layout; set %s.config_path = %q by hand", file, dotted(c.registry), dir)
	}
	if !reflect.DeepEqual(withoutKey(before.data, c.registry), withoutKey(d.data, c.registry)) {
		return fmt.Errorf("%s: adding config_path would change other settings; set %s.config_path = %q by hand", file, dotted(c.registry), dir)
	}
	return nil
}

// withoutKey copies m with table.config_path removed, and the tables on the way removed
// when that leaves them empty, so "added a key" compares equal to "nothing changed".
func withoutKey(m map[string]any, table []string) map[string]any {
	var strip func(m map[string]any, path []string) map[string]any
	strip = func(m map[string]any, path []string) map[string]any {
		out := make(map[string]any, len(m))
		for k, v := range m {
			out[k] = v
		}
		if len(path) == 0 {
			delete(out, "config_path")
			return out
		}
		sub, ok := out[path[0]].(map[string]any)
		if !ok {
			return out
		}
		sub = strip(sub, path[1:])
		if len(sub) == 0 {
			delete(out, path[0])
		} else {
			out[path[0]] = sub
		}
		return out
	}
	return strip(m, table)
}

// revertConfigPath undoes setConfigPath on a config.toml changed since install: back to the
// original value, or the key (and a registry table we added, if left empty) removed.
// A config_path someone has since pointed elsewhere is theirs and stays.
func revertConfigPath(file string, cur, orig []byte, ours string) ([]byte, error) {
	d, c, err := readContainerdConfig(file, cur)
	if err != nil {
		return nil, err
	}
	if !c.set || c.configPath != ours {
		return cur, nil
	}
	_, oc, err := readContainerdConfig(file, orig)
	if err != nil {
		return nil, fmt.Errorf("%s (saved original): %w", file, err)
	}
	key := append(append([]string{}, c.registry...), "config_path")
	i := d.find(unstable.KeyValue, key...)
	if i < 0 {
		// Set through an inline table or dotted key we did not write; leave it.
		return cur, nil
	}
	e := d.exprs[i]
	if oc.set {
		return splice(cur, e.valStart, e.valEnd, tomlStringLike(cur[e.valStart:e.valEnd], oc.configPath)), nil
	}
	b := splice(cur, e.start, e.end, "")
	od, err := parseTOML(file, orig)
	if err != nil {
		return nil, err
	}
	if od.find(unstable.Table, c.registry...) < 0 {
		nd, err := parseTOML(file, b)
		if err != nil {
			return nil, err
		}
		if t := nd.find(unstable.Table, c.registry...); t >= 0 {
			if v, _ := lookup(nd.data, c.registry...); v != nil && len(v.(map[string]any)) == 0 {
				atEnd := nd.exprs[t].end == len(b)
				b = splice(b, nd.exprs[t].start, nd.exprs[t].end, "")
				// Take the blank line we put before a table appended at the end.
				if atEnd && strings.HasSuffix(string(b), "\n\n") {
					b = b[:len(b)-1]
				}
			}
		}
	}
	return b, nil
}

// tomlStringLike writes s as a TOML string quoted like the value it replaces: containerd
// 2.x's generated configs use literal strings ('...'), and an edit should not stand out.
func tomlStringLike(was []byte, s string) string {
	if len(was) > 0 && was[0] == '\'' && !strings.ContainsAny(s, "'\r\n") && tomlString(s) == `"`+s+`"` {
		return "'" + s + "'"
	}
	return tomlString(s)
}

// line is the line where the expression at path (or the first one inside it) starts.
func (d *tomlDoc) line(path ...string) int {
	for _, e := range d.exprs {
		if e.kind != unstable.Comment && hasPrefix(e.path, path) {
			return lineOf(d.src, e.start)
		}
	}
	for _, e := range d.exprs {
		if e.kind != unstable.Comment && len(e.path) > 0 && hasPrefix(path, e.path) && e.inline {
			return lineOf(d.src, e.start)
		}
	}
	return 1
}

// dotted writes a TOML key path, quoting parts that need it.
func dotted(path []string) string {
	parts := make([]string, len(path))
	for i, p := range path {
		parts[i] = quoteKey(p)
	}
	return strings.Join(parts, ".")
}
