// Package hosts points the container engines on a host at the node-local mirror, and takes
// that back again: containerd hosts.toml files and config_path, Docker's daemon.json and
// certs.d, and a containers registries.conf.d drop-in (CRI-O, Podman, skopeo).
//
// Install and Uninstall only read and plan; nothing is written until Plan.Apply, so a file
// that does not parse stops the whole run before any file changed. Apply writes each file
// atomically and records what it changed in StatePath, which Uninstall uses to restore
// each file byte for byte, or, when someone edited a file since, to remove only our entries.
// The record decides what uninstall writes as root, so it is read only if nobody but root
// could have written it, and it may name only the files install writes.
package hosts

import (
	"slices"
	"strings"
)

// Engines install knows, in the order it configures them.
const (
	Containerd = "containerd"
	Docker     = "docker"
	CRIO       = "crio"
)

// Engines lists every engine install can configure.
var Engines = []string{Containerd, Docker, CRIO}

// Wildcard as the only registry mirrors every registry (containerd's _default).
const Wildcard = "*"

// Options say what install does.
type Options struct {
	// Root is the directory that stands for / (as systemctl --root); "" means /.
	Root string
	// MirrorURL is where the mirror listens, e.g. http://127.0.0.1:5000.
	MirrorURL string
	// Registries are the registries to pull through the mirror, as clients name them;
	// []string{"*"} means all (containerd's _default hosts.toml).
	Registries []string
	// Served are the registries the mirror serves; containers/image has no catch-all entry,
	// so with "*" its drop-in lists these. Empty means config.DefaultRegistries.
	Served []string
	// Engines to configure; empty means every engine found on the host.
	Engines []string
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// deepestFirst orders directories innermost first, so each is removed before its parent.
func deepestFirst(s []string) []string {
	out := slices.Clone(s)
	slices.SortStableFunc(out, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	return out
}
