// Package platformpick chooses the one image of an index that an engine pulls.
package platformpick

import (
	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Best is the manifest among ds that m ranks first, as an engine pulls the one image
// that suits it best, not every image its platform could run (linux/arm64 also runs
// linux/arm/v7). ok is false when none matches; entries without a platform never do.
func Best(m platforms.MatchComparer, ds []ocispec.Descriptor) (best ocispec.Descriptor, ok bool) {
	for _, d := range ds {
		if d.Platform == nil || !m.Match(*d.Platform) {
			continue
		}
		if !ok || m.Less(*d.Platform, *best.Platform) {
			best, ok = d, true
		}
	}
	return best, ok
}
