// Package cachehdr names the response header in which the mirror tells a client what
// became of a blob, and its values. The mirror sets it and prefetch reads it; both import
// this package, so the two sides cannot drift apart, and prefetch does not pull in the
// mirror (and containerd) for a few strings.
package cachehdr

// Header is the response header carrying one of the values below.
const Header = "Node-Mirror-Cache"

const (
	// Hit: served from the store.
	Hit = "hit"
	// Miss: fetched from upstream, verified and stored.
	Miss = "miss"
	// PassThrough: fetched from upstream and not stored (disk full, budget in use).
	PassThrough = "pass-through"
)
