package mirror

import (
	"context"

	"github.com/node-mirror/node-mirror/internal/cachehdr"
)

// Cache results, as logs and metrics name them. A hit and a miss read the same in the
// cache header; a pass-through does not (the metric label predates the header).
const (
	ResultHit   = cachehdr.Hit  // answered from the store
	ResultMiss  = cachehdr.Miss // fetched from upstream
	ResultStale = "stale"       // upstream failed or was slow; answered from the store
	ResultError = "error"       // answered with an error
	// ResultPassThrough: fetched from upstream and not stored (disk full, budget in use).
	ResultPassThrough = "passthrough"
)

// cacheHeader tells clients such as prefetch what happened to a blob: hit, miss (fetched
// and stored) or pass-through (fetched, not stored).
const cacheHeader = cachehdr.Header

// Outcome is what the mirror did with one request, for the access log and metrics. The
// server puts one in the request context with WithOutcome; the mirror fills it in.
type Outcome struct {
	Registry string
	Repo     string
	Kind     string // manifest, blob, tags, referrers
	Ref      string
	Result   string
}

type outcomeKey struct{}

// WithOutcome returns a context carrying a fresh Outcome.
func WithOutcome(ctx context.Context) (context.Context, *Outcome) {
	o := &Outcome{}
	return context.WithValue(ctx, outcomeKey{}, o), o
}

// outcomeOf returns the request's Outcome, or a throwaway one when the server did not
// ask for it (tests using the handler alone).
func outcomeOf(ctx context.Context) *Outcome {
	if o, ok := ctx.Value(outcomeKey{}).(*Outcome); ok {
		return o
	}
	return &Outcome{}
}

var kindNames = map[string]string{
	kindManifests: "manifest", kindBlobs: "blob", kindTags: "tags", kindReferrers: "referrers",
}

func noteRoute(ctx context.Context, rt route) {
	o := outcomeOf(ctx)
	o.Registry, o.Repo, o.Kind, o.Ref = rt.registry, rt.repo, kindNames[rt.kind], rt.ref
}

func noteResult(ctx context.Context, result string) { outcomeOf(ctx).Result = result }
