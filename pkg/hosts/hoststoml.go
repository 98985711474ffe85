package hosts

import (
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"
)

// mirrorDialTimeout bounds the connect to the mirror, so a node whose mirror is down pays
// at most this per pull before containerd moves on to the real registry (containerd 1.7+;
// older versions ignore the key).
const mirrorDialTimeout = "1s"

// hostsTOML is what node-mirror wants in one registry's hosts.toml.
type hostsTOML struct {
	mirror string // the mirror URL, e.g. http://127.0.0.1:5000
	server string // the real registry; "" for _default, which has no single one
}

// block is our host entry. It starts with a comment so an operator reading the file knows
// where it came from; the comment sits directly above the header and so belongs to it.
func (h hostsTOML) block() string {
	return "# node-mirror: pull through the node-local mirror first (`node-mirror uninstall` removes this).\n" +
		"[host." + tomlString(h.mirror) + "]\n" +
		"  capabilities = [\"pull\", \"resolve\"]\n" +
		"  dial_timeout = " + tomlString(mirrorDialTimeout) + "\n"
}

// mergeHostsTOML returns cur (an existing hosts.toml, or nil) with our mirror as the first
// host containerd tries. A new file also names the real registry as server; an existing
// one keeps its own server or none, whose meaning containerd already fixes (the registry
// itself, over http for localhost). The user's hosts (CAs, other mirrors) stay, after ours;
// old lists mirror URLs of earlier installs whose entries are replaced.
func mergeHostsTOML(file string, cur []byte, h hostsTOML, old []string) ([]byte, error) {
	before, err := parseTOML(file, cur)
	if err != nil {
		return nil, err
	}
	b, err := removeHostTables(file, cur, append(slices.Clone(old), h.mirror))
	if err != nil {
		return nil, err
	}
	d, err := parseTOML(file, b)
	if err != nil {
		return nil, err
	}
	firstTable := len(b)
	for i, e := range d.exprs {
		if e.kind == unstable.Table || e.kind == unstable.ArrayTable {
			firstTable = d.leadStart(i)
			break
		}
	}
	addServer := h.server != "" && isBlank(before)
	if addServer {
		line := "server = " + tomlString(h.server) + "\n"
		at := -1
		for _, e := range d.exprs {
			if e.start >= firstTable {
				break
			}
			if e.kind == unstable.KeyValue {
				at = e.end
			}
		}
		if at < 0 {
			at = firstTable
			if at < len(b) {
				line += "\n"
			}
		}
		b = splice(b, at, at, ensureNewline(b, at)+line)
		if d, err = parseTOML(file, b); err != nil {
			return nil, fmt.Errorf("%s: adding server: %w", file, err)
		}
	}
	// Our entry goes right before the first host table: containerd tries hosts in the
	// order their tables appear in the file.
	at := -1
	for i, e := range d.exprs {
		if e.kind == unstable.Table && len(e.path) >= 2 && e.path[0] == "host" {
			at = d.leadStart(i)
			break
		}
	}
	if at >= 0 {
		b = splice(b, at, at, h.block()+"\n")
	} else {
		sep := ensureNewline(b, len(b))
		if len(b)+len(sep) > 0 && !strings.HasSuffix(string(b)+sep, "\n\n") {
			sep += "\n"
		}
		b = append(b, sep+h.block()...)
	}
	if err := verifyHostsTOML(file, before, b, h, addServer, old); err != nil {
		return nil, err
	}
	return b, nil
}

// isBlank tells whether a document has nothing but comments and blank lines.
func isBlank(d *tomlDoc) bool {
	for _, e := range d.exprs {
		if e.kind != unstable.Comment {
			return false
		}
	}
	return true
}

// ensureNewline is the newline needed before inserting at offset at, so an insert never
// joins the previous line.
func ensureNewline(b []byte, at int) string {
	if at > 0 && b[at-1] != '\n' {
		return "\n"
	}
	return ""
}

// removeHostTables deletes the [host."<url>"] tables (and their sub-tables) for each url,
// with the comment block above each and the blank lines after it.
func removeHostTables(file string, b []byte, urls []string) ([]byte, error) {
	d, err := parseTOML(file, b)
	if err != nil {
		return nil, err
	}
	type span struct{ from, to int }
	var spans []span
	ours := func(e tomlExpr) bool {
		return (e.kind == unstable.Table || e.kind == unstable.ArrayTable) &&
			len(e.path) >= 2 && e.path[0] == "host" && slices.Contains(urls, e.path[1])
	}
	for i := 0; i < len(d.exprs); i++ {
		if !ours(d.exprs[i]) {
			continue
		}
		from := d.leadStart(i)
		to := len(b)
		j := i + 1
		for ; j < len(d.exprs); j++ {
			e := d.exprs[j]
			if e.kind == unstable.Table || e.kind == unstable.ArrayTable {
				if ours(e) {
					continue
				}
				to = d.leadStart(j)
				break
			}
		}
		spans = append(spans, span{from, to})
		i = j - 1
	}
	for k := len(spans) - 1; k >= 0; k-- {
		b = splice(b, spans[k].from, spans[k].to, "")
	}
	return b, nil
}

// hostOrder lists the hosts of a hosts.toml in the order containerd tries them: the order
// of their [host."..."] tables (core/remotes/docker/config.getSortedHosts).
func hostOrder(d *tomlDoc) []string {
	var out []string
	for _, e := range d.exprs {
		if e.kind == unstable.Table && len(e.path) >= 2 && e.path[0] == "host" && !slices.Contains(out, e.path[1]) {
			out = append(out, e.path[1])
		}
	}
	return out
}

// verifyHostsTOML re-parses what we are about to write: our mirror must be the first host,
// the server must be set as intended, and every other setting must be unchanged.
func verifyHostsTOML(file string, before *tomlDoc, after []byte, h hostsTOML, addedServer bool, old []string) error {
	d, err := parseTOML(file, after)
	if err != nil {
		return fmt.Errorf("%s: merged hosts.toml does not parse (please report this): %w", file, err)
	}
	if order := hostOrder(d); len(order) == 0 || order[0] != h.mirror {
		return fmt.Errorf("%s: cannot put the mirror first in this layout (hosts defined with dotted keys or inline tables?); add [host.%s] as the first host by hand", file, tomlString(h.mirror))
	}
	want := stripHost(before.data, append(slices.Clone(old), h.mirror))
	got := stripHost(d.data, []string{h.mirror})
	if addedServer {
		want["server"] = h.server
	}
	if !reflect.DeepEqual(want, got) {
		return fmt.Errorf("%s: merging would change settings other than the mirror entry; refusing (please report this)", file)
	}
	return nil
}

// stripHost copies m without host.<url> for each url, and without an empty host table.
func stripHost(m map[string]any, urls []string) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = v
	}
	if hosts, ok := out["host"].(map[string]any); ok {
		rest := make(map[string]any, len(hosts))
		for k, v := range hosts {
			if !slices.Contains(urls, k) {
				rest[k] = v
			}
		}
		if len(rest) == 0 {
			delete(out, "host")
		} else {
			out["host"] = rest
		}
	}
	return out
}

// unmergeHostsTOML removes our entries from a hosts.toml someone changed after install:
// the mirror tables, and server when we added it. It returns nil when nothing but
// whitespace would be left, meaning the file should go.
func unmergeHostsTOML(file string, cur []byte, mirrors []string, addedServer string) ([]byte, error) {
	b, err := removeHostTables(file, cur, mirrors)
	if err != nil {
		return nil, err
	}
	if addedServer != "" {
		d, err := parseTOML(file, b)
		if err != nil {
			return nil, err
		}
		if i := d.find(unstable.KeyValue, "server"); i >= 0 && d.data["server"] == addedServer {
			e := d.exprs[i]
			to := e.end
			// Take the blank line we put after server when it opened the file.
			if e.start == 0 && strings.HasPrefix(string(b[to:]), "\n") {
				to++
			}
			b = splice(b, e.start, to, "")
		}
	}
	if strings.TrimSpace(string(b)) == "" {
		return nil, nil
	}
	// Removing the last table can leave the blank line that separated it.
	for strings.HasSuffix(string(b), "\n\n") {
		b = b[:len(b)-1]
	}
	return b, nil
}
